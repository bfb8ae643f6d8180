"""The Helm chart, rendered (no cluster): lint, CRDs, hardening, RBAC against the code, values.

What the operator's RBAC must allow is read from the code itself, so a reconciler that
starts touching a new kind fails here until the chart grants it: every kind in
``kubeforge/kube.py``'s path table, and every resource a kopf handler is registered for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import kopf
import pytest
import yaml

import kubeforge.controllers  # noqa: F401  (registers the reconcilers' handlers)
from kubeforge import kube
from kubeforge.controllers import webhooks
from support.chart import CHART, REPO, find, helm, render

KUBEFORGE_CRDS = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
PEERING_CRDS = {"clusterkopfpeerings.kopf.dev.yaml": ("ClusterKopfPeering", "Cluster"),
                "kopfpeerings.kopf.dev.yaml": ("KopfPeering", "Namespaced")}
NAMESPACED = {"rbac.scope": "namespaces", "watchNamespaces": "{team-a,team-b}"}

# kind -> API group, for the kinds kubeforge/kube.py can touch.
_GROUPS = {"/api/v1": "", "/apis/batch/v1": "batch", "/apis/apps/v1": "apps",
           "/apis/autoscaling/v2": "autoscaling", "/apis/policy/v1": "policy",
           "/apis/networking.k8s.io/v1": "networking.k8s.io",
           "/apis/kubeforge.io/v1alpha1": "kubeforge.io"}


def allows(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    for rule in rules:
        if (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", [])) \
                and (resource in rule.get("resources", []) or "*" in rule.get("resources", [])) \
                and (verb in rule["verbs"] or "*" in rule["verbs"]):
            return True
    return False


@pytest.fixture(scope="module")
def default_docs():
    return render()


@pytest.fixture(scope="module")
def namespaced_docs():
    return render(NAMESPACED)


# --- chart basics -------------------------------------------------------------------------

def test_helm_lint_passes_strict():
    out = helm("lint", str(CHART), "--strict", "--kube-version", "1.35.4")
    assert "0 chart(s) failed" in out.stdout


def test_helm_lint_namespaced_mode():
    helm("lint", str(CHART), "--strict", "--kube-version", "1.35.4",
         "--set", "rbac.scope=namespaces", "--set", "watchNamespaces={a,b}")


def test_kube_version_constraint_is_1_3x():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.30.0-0 <1.40.0-0"
    ok = helm("template", "x", str(CHART), "--kube-version", "1.39.0", check=False)
    assert ok.returncode == 0, ok.stderr
    for bad in ("1.29.9", "1.40.0"):
        out = helm("template", "x", str(CHART), "--kube-version", bad, check=False)
        assert out.returncode != 0 and "kubeVersion" in out.stderr, bad


def test_chart_crds_are_the_generated_crds():
    chart_crds = CHART / "crds"
    for name in KUBEFORGE_CRDS:
        assert (chart_crds / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"charts/kubeforge/crds/{name} differs from crds/{name}: run hack/render-kustomize.py")
    assert sorted(p.name for p in chart_crds.glob("*.yaml")) == sorted([*KUBEFORGE_CRDS, *PEERING_CRDS])


@pytest.mark.parametrize("filename", sorted(PEERING_CRDS))
def test_kopf_peering_crds(filename):
    crd = yaml.safe_load((CHART / "crds" / filename).read_text())
    kind, scope = PEERING_CRDS[filename]
    assert crd["spec"]["group"] == "kopf.dev" and crd["spec"]["names"]["kind"] == kind
    assert crd["spec"]["scope"] == scope
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1" and version["served"] and version["storage"]
    assert version["schema"]["openAPIV3Schema"]["properties"]["status"]["x-kubernetes-preserve-unknown-fields"]


def test_values_schema_rejects_bad_values():
    for values, message in (
        ({"bogus": "1"}, "additional properties 'bogus'"),
        ({"runAsUser": "0"}, "runAsUser"),
        ({"rbac.scope": "everything"}, "scope"),
        ({"rbac.scope": "namespaces"}, "watchNamespaces"),
        ({"webhook.failurePolicy": "Maybe"}, "failurePolicy"),
        ({"image.digest": "latest"}, "digest"),
    ):
        out = helm("template", "x", str(CHART), "--kube-version", "1.35.4",
                   *[a for k, v in values.items() for a in ("--set", f"{k}={v}")], check=False)
        assert out.returncode != 0 and message in out.stderr, (values, out.stderr)
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False


# --- the operator Deployment --------------------------------------------------------------

def operator_container(docs):
    (dep,) = find(docs, "Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, container


def test_operator_pod_is_hardened(default_docs):
    dep, c = operator_container(default_docs)
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert f"--liveness-port={ports['healthz']}" in c["args"]
    assert f"--metrics-port={ports['metrics']}" in c["args"]
    assert f"--webhook-port={ports['webhook']}" in c["args"]


def test_operator_runs_as_the_operator_image_user(default_docs):
    dep, _ = operator_container(default_docs)
    dockerfile = (REPO / "operator" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\d+)", dockerfile, re.M)
    assert users and int(users[-1].split(":")[0]) == dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_images_have_no_registry_host_and_runtime_image_is_passed(default_docs):
    _, c = operator_container(default_docs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KUBEFORGE_RUNTIME_IMAGE"] == "kubeforge/runtime:0.1.0"
    assert c["image"] == "kubeforge/operator:0.1.0"
    docs = render({"runtimeImage.repository": "registry.example.com/ml/runtime", "runtimeImage.tag": "v9",
                   "image.digest": "sha256:" + "a" * 64})
    _, c = operator_container(docs)
    assert {e["name"]: e.get("value") for e in c["env"]}["KUBEFORGE_RUNTIME_IMAGE"] == "registry.example.com/ml/runtime:v9"
    assert c["image"] == "kubeforge/operator@sha256:" + "a" * 64
    # The vLLM server image (engine.backend: vllm): pinned by default, settable like the others.
    _, c = operator_container(default_docs)
    assert {e["name"]: e.get("value") for e in c["env"]}["KUBEFORGE_VLLM_IMAGE"] == "vllm/vllm-openai:v0.32.0"
    _, c = operator_container(render({"vllmImage.repository": "registry.example.com/vllm/vllm-openai"}))
    assert {e["name"]: e.get("value") for e in c["env"]}["KUBEFORGE_VLLM_IMAGE"] == \
        "registry.example.com/vllm/vllm-openai:v0.32.0"
    text = "".join(p.read_text() for p in (CHART).rglob("*") if p.is_file())
    for host in ("docker.io", "ghcr.io", "quay.io", "nvcr.io", "gcr.io", "registry.k8s.io"):
        assert host not in text, host


def test_two_replicas_peer_and_one_replica_is_standalone(default_docs):
    dep, c = operator_container(default_docs)
    assert dep["spec"]["replicas"] == 2
    assert "--peering=kubeforge" in c["args"] and "--standalone" not in c["args"]
    assert find(default_docs, "ClusterKopfPeering", "kubeforge")
    assert {e["name"] for e in c["env"]} >= {"POD_ID"}  # kopf's identity: the pod name
    (pdb,) = find(default_docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    single = render({"replicaCount": "1"})
    _, c1 = operator_container(single)
    assert "--standalone" in c1["args"] and not any(a.startswith("--peering") for a in c1["args"])
    assert not find(single, "ClusterKopfPeering") and not find(single, "PodDisruptionBudget")


def test_namespaced_mode_flags_and_peerings(namespaced_docs):
    _, c = operator_container(namespaced_docs)
    assert [a for a in c["args"] if a.startswith("--namespace=")] == ["--namespace=team-a", "--namespace=team-b"]
    assert sorted(p["metadata"]["namespace"] for p in find(namespaced_docs, "KopfPeering")) == ["team-a", "team-b"]
    assert not find(namespaced_docs, "ClusterKopfPeering")


def test_metrics_service_and_optional_service_monitor(default_docs):
    (svc,) = find(default_docs, "Service", "kf-kubeforge-metrics")
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert not find(default_docs, "ServiceMonitor")
    (sm,) = find(render({"metrics.serviceMonitor.enabled": "true"}), "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"]["kubeforge.io/service"] == "metrics"


# --- RBAC ---------------------------------------------------------------------------------

def _cluster_rules(docs):
    (role,) = find(docs, "ClusterRole")
    return role["rules"]


def test_rbac_has_no_wildcards_no_secrets_no_exec(default_docs, namespaced_docs):
    for docs in (default_docs, namespaced_docs):
        for role in find(docs, "ClusterRole") + find(docs, "Role"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
                for res in rule["resources"]:
                    assert res not in ("secrets", "pods/exec", "pods/attach", "pods/portforward", "serviceaccounts/token",
                                       "nodes", "clusterroles", "roles", "rolebindings", "clusterrolebindings"), res
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_rbac_grants_what_kube_py_touches(default_docs):
    rules = _cluster_rules(default_docs)
    for kind, (prefix, plural) in kube._RESOURCES.items():
        group = _GROUPS[prefix]
        if kind == "Event":  # posted (kopf.info/warn), never read back
            assert allows(rules, group, plural, "create")
            continue
        for verb in ("get", "list"):
            assert allows(rules, group, plural, verb), (kind, verb)
        if kind == "Pod":
            assert not allows(rules, group, plural, "patch") and not allows(rules, group, plural, "delete")
        elif group == "kubeforge.io":
            assert allows(rules, group, plural, "patch") and allows(rules, group, f"{plural}/status", "patch")
            assert not allows(rules, group, plural, "create")  # never creates or rewrites user objects
        else:  # children: server-side apply creates and patches; re-creation deletes
            for verb in ("create", "patch", "delete", "watch"):
                assert allows(rules, group, plural, verb), (kind, verb)


def test_rbac_grants_list_watch_for_every_kopf_handler(default_docs):
    rules = _cluster_rules(default_docs)
    registry = kopf.get_default_registry()
    # Change handlers and daemons/timers keep state on the object (annotations, finalizers):
    # kopf patches those; event and index handlers only watch.
    writers = [*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()]
    readers = [*registry._watching.get_all_handlers(), *registry._indexing.get_all_handlers()]
    assert writers and readers
    for h in writers + readers:
        sel = h.selector
        resource = sel.plural or sel.any_name
        for verb in ("list", "watch", "patch") if h in writers else ("list", "watch"):
            assert allows(rules, sel.group, resource, verb), (h.id, sel, verb)
    # kopf itself: CRD discovery, events, peering
    assert allows(rules, "apiextensions.k8s.io", "customresourcedefinitions", "watch")
    assert allows(rules, "kopf.dev", "clusterkopfpeerings", "patch")
    assert allows(rules, "", "events", "create")


def test_namespaced_rbac_is_per_namespace(namespaced_docs):
    roles = find(namespaced_docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = find(namespaced_docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "kf-kubeforge", "namespace": "kubeforge"}]
    # The one ClusterRole only discovers: no namespaced object of any kind.
    (cluster_role,) = find(namespaced_docs, "ClusterRole")
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == {"customresourcedefinitions", "namespaces"}
    assert {v for rule in cluster_role["rules"] for v in rule["verbs"]} == {"list", "watch"}
    assert allows(roles[0]["rules"], "kopf.dev", "kopfpeerings", "patch")


# --- webhook ------------------------------------------------------------------------------

def test_webhook_paths_match_the_handlers(default_docs):
    (vwc,) = find(default_docs, "ValidatingWebhookConfiguration")
    routed = {w["rules"][0]["resources"][0]: w["clientConfig"]["service"]["path"].lstrip("/") for w in vwc["webhooks"]}
    assert routed == webhooks.WEBHOOK_PATHS
    ids = {h.id for h in kopf.get_default_registry()._webhooks.get_all_handlers()}
    assert set(routed.values()) <= ids
    for w in vwc["webhooks"]:
        assert w["sideEffects"] == "None" and w["failurePolicy"] == "Fail"
        assert w["rules"][0]["operations"] == ["CREATE", "UPDATE"]
        assert w["clientConfig"]["caBundle"]


def test_webhook_self_signed_certificate_matches_its_ca(default_docs, tmp_path):
    import base64
    import subprocess

    (secret,) = find(default_docs, "Secret", "kf-kubeforge-webhook-tls")
    (vwc,) = find(default_docs, "ValidatingWebhookConfiguration")
    assert secret["type"] == "kubernetes.io/tls"
    assert vwc["webhooks"][0]["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    for key in ("ca.crt", "tls.crt"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    out = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "tls.crt")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(tmp_path / "tls.crt")],
                          capture_output=True, text=True, check=True).stdout
    assert "DNS:kf-kubeforge-webhook.kubeforge.svc" in text


def test_webhook_with_cert_manager(default_docs):
    docs = render({"webhook.certManager.enabled": "true"})
    (cert,) = find(docs, "Certificate", "kf-kubeforge-webhook")
    assert cert["spec"]["secretName"] == "kf-kubeforge-webhook-tls"
    assert "kf-kubeforge-webhook.kubeforge.svc" in cert["spec"]["dnsNames"]
    assert find(docs, "Issuer") and not find(docs, "Secret")
    # Renewals keep the trusted CA: the serving certificate comes from a CA Issuer over a CA
    # certificate of the chart's own (a self-signed serving certificate would be a new CA each time).
    (issuer,) = find(docs, "Issuer", cert["spec"]["issuerRef"]["name"])
    (ca,) = find(docs, "Certificate", "kf-kubeforge-webhook-ca")
    assert issuer["spec"] == {"ca": {"secretName": ca["spec"]["secretName"]}}
    assert ca["spec"]["isCA"] is True and ca["spec"]["duration"] == "87600h"
    assert find(docs, "Issuer", ca["spec"]["issuerRef"]["name"])[0]["spec"] == {"selfSigned": {}}
    (vwc,) = find(docs, "ValidatingWebhookConfiguration")
    assert vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "kubeforge/kf-kubeforge-webhook"
    assert "caBundle" not in vwc["webhooks"][0]["clientConfig"]
    docs = render({"webhook.certManager.enabled": "true", "webhook.certManager.issuerRef.kind": "ClusterIssuer",
                   "webhook.certManager.issuerRef.name": "corp-ca"})
    assert not find(docs, "Issuer")
    (cert,) = find(docs, "Certificate")
    assert cert["spec"]["issuerRef"] == {"kind": "ClusterIssuer", "name": "corp-ca"}


def test_webhook_skips_metadata_only_updates_and_reloads_its_certificate(default_docs):
    (vwc,) = find(default_docs, "ValidatingWebhookConfiguration")
    for hook in vwc["webhooks"]:
        exprs = {c["name"]: c["expression"] for c in hook["matchConditions"]}
        assert "object.spec != oldObject.spec" in exprs["spec-changed"]
        assert exprs["not-being-deleted"] == "!has(object.metadata.deletionTimestamp)"
    _, c = operator_container(default_docs)
    assert "--webhook-cert-check-seconds=10" in c["args"]


def test_webhook_disabled_renders_no_webhook_parts():
    docs = render({"webhook.enabled": "false"})
    assert not find(docs, "ValidatingWebhookConfiguration") and not find(docs, "Secret")
    _, c = operator_container(docs)
    assert not any(a.startswith("--webhook") for a in c["args"])


def test_namespaced_webhook_only_sees_watched_namespaces(namespaced_docs):
    (vwc,) = find(namespaced_docs, "ValidatingWebhookConfiguration")
    for w in vwc["webhooks"]:
        (expr,) = w["namespaceSelector"]["matchExpressions"]
        assert expr == {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}


def test_templates_have_a_comment_saying_why():
    for path in (CHART / "templates").glob("*.yaml"):
        assert "#" in path.read_text() or "{{- /*" in path.read_text(), path.name


# --- workload policy and NetworkPolicies (issue 17) -----------------------------------------------

def operator_env(docs) -> dict[str, str]:
    _, c = operator_container(docs)
    return {e["name"]: e["value"] for e in c["env"] if "value" in e}


def test_workload_policy_values_reach_the_operator(default_docs):
    """The operator parses the Deployment's env exactly as it will at run time: the chart's
    defaults are the code's defaults, and each value widens what the operator allows."""
    from kubeforge.api import policy

    assert policy.from_env(operator_env(default_docs)) == policy.WorkloadPolicy()
    docs = render({"workloadPolicy.allowedVolumeTypes": "{persistentVolumeClaim,nfs}",
                   "workloadPolicy.allowImageOverride": "true", "workloadPolicy.allowServiceAccount": "true"})
    assert policy.from_env(operator_env(docs)) == policy.WorkloadPolicy(
        frozenset({"persistentVolumeClaim", "nfs"}), allow_image_override=True, allow_service_account=True)
    none = render(extra=["--set-json", "workloadPolicy.allowedVolumeTypes=[]"])
    assert policy.from_env(operator_env(none)).allowed_volume_types == frozenset()


def test_network_policy_values_reach_the_operator(default_docs):
    from kubeforge.builders import network

    net = network.settings_from_env(operator_env(default_docs))
    assert net.enabled is True and net.serving_clients == network.SAME_NAMESPACE
    assert net.prometheus == ({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},)
    # The operator's own pods, in the release namespace, by the Deployment's selector.
    (dep,) = find(default_docs, "Deployment")
    assert net.operator == ({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeforge"}},
                             "podSelector": dep["spec"]["selector"]},)
    docs = render({"networkPolicy.workloads": "false", "networkPolicy.prometheus.namespaceSelector": "null"},
                  extra=["--set-json", 'networkPolicy.servingClients=[{"namespaceSelector":{"matchLabels":{"team":"a"}}}]'])
    net = network.settings_from_env(operator_env(docs))
    assert net.enabled is False
    assert net.prometheus == ({"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},)
    assert net.serving_clients == ({"namespaceSelector": {"matchLabels": {"team": "a"}}},)


def test_operator_network_policy(default_docs):
    (dep,) = find(default_docs, "Deployment")
    (main,) = find(default_docs, "NetworkPolicy", "kf-kubeforge")
    (hook,) = find(default_docs, "NetworkPolicy", "kf-kubeforge-webhook")
    for pol in (main, hook):
        assert pol["spec"]["podSelector"] == dep["spec"]["selector"] and pol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = main["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert rule["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    assert hook["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 9443}]}]
    # No metrics, no webhook: the operator's pods accept nothing (never an empty `from`).
    docs = render({"metrics.enabled": "false", "webhook.enabled": "false"})
    (only,) = find(docs, "NetworkPolicy")
    assert only["spec"]["ingress"] == []
    assert find(render({"networkPolicy.operator": "false"}), "NetworkPolicy") == []


def test_values_schema_rejects_bad_policy_values():
    for bad in ({"workloadPolicy.allowImageOverride": "maybe"}, {"networkPolicy.workload": "true"}):
        out = helm("template", "x", str(CHART), "--kube-version", "1.35.4",
                   *[a for k, v in bad.items() for a in ("--set", f"{k}={v}")], check=False)
        assert out.returncode != 0, bad


def test_admission_policy_fences_the_operator_out_of_system_namespaces(default_docs):
    (vap,) = find(default_docs, "ValidatingAdmissionPolicy")
    (binding,) = find(default_docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}
    (expr,) = vap["spec"]["matchConstraints"]["namespaceSelector"]["matchExpressions"]
    assert expr["values"] == ["kube-system", "kube-public", "kube-node-lease", "kubeforge"]  # + the chart's own
    (rule,) = vap["spec"]["matchConstraints"]["resourceRules"]
    assert rule["scope"] == "Namespaced" and rule["operations"] == ["CREATE", "UPDATE", "DELETE"]
    (cond,) = vap["spec"]["matchConditions"]
    assert cond["expression"] == "request.userInfo.username == 'system:serviceaccount:kubeforge:kf-kubeforge'"

    # The chart's namespace is not fenced when resources live there; a fenced one cannot be watched.
    docs = render({"rbac.scope": "namespaces", "watchNamespaces": "{kubeforge,team-a}"})
    (vap,) = find(docs, "ValidatingAdmissionPolicy")
    assert "kubeforge" not in vap["spec"]["matchConstraints"]["namespaceSelector"]["matchExpressions"][0]["values"]
    with pytest.raises(AssertionError, match="watchNamespaces: kube-system is in admissionPolicy.fencedNamespaces"):
        render({"rbac.scope": "namespaces", "watchNamespaces": "{kube-system}"})
    assert not find(render({"admissionPolicy.enabled": "false"}), "ValidatingAdmissionPolicy")


def test_a_namespace_allow_list_needs_the_namespaced_rbac_mode():
    """watchNamespaces with a ClusterRole would look restricted and not be: refused with the fix named."""
    with pytest.raises(AssertionError, match="watchNamespaces is set but rbac.scope is cluster"):
        render({"watchNamespaces": "{team-a}"})
