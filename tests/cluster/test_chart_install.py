"""The chart on the real control plane: dry-run, install, the operator as the chart's
ServiceAccount, the RBAC matrix, and GitOps ownership of fields.

The release is installed once per session (tests/cluster/conftest.py). The operator runs as
a local process with the chart's Deployment args and a kubeconfig holding only a token of the
chart's ServiceAccount, so every request it makes is authorised by the chart's RBAC alone.
"""

from __future__ import annotations

import json
import uuid

import pytest
import yaml

from support.chart import (
    CHART, KUBE_VERSION, OperatorAs, accepted, children, controller_creates_children, deployment_command, helm,
    local_args, rbac_denials, sa_kubeconfig, three_kinds,
)
from support.cluster import free_port
from support.waiting import wait_for

pytestmark = pytest.mark.cluster

RELEASE, SA = "kf", "kf-kubeforge"


@pytest.fixture
def release(chart_release):
    return chart_release


def test_helm_template_passes_server_side_dry_run(cluster, release, namespace):
    # Both RBAC modes and the webhook with its self-signed certificate, checked by the API
    # server itself (schemas, admission) without persisting anything.
    for values in ([], ["--set", "rbac.scope=namespaces", "--set", f"watchNamespaces={{{namespace}}}"],
                   ["--set", "metrics.serviceMonitor.enabled=false", "--set", "webhook.failurePolicy=Ignore"]):
        rendered = helm("template", "dry", str(CHART), "--namespace", release, "--kube-version", KUBE_VERSION,
                        *values).stdout
        out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
        assert out.returncode == 0, f"{values}:\n{out.stdout}\n{out.stderr}"
        kinds = {d["kind"] for d in yaml.safe_load_all(rendered) if d}
        assert {"Deployment", "ServiceAccount", "ValidatingWebhookConfiguration", "Secret"} <= kinds


def test_helm_install_installs_it(cluster, release):
    status = json.loads(helm("status", RELEASE, "-n", release, "-o", "json", env=cluster.env()).stdout)
    assert status["info"]["status"] == "deployed"
    notes = status["info"]["notes"]  # NOTES.txt, rendered against the real release
    assert f'installed as release "kf" in namespace "{release}"' in notes
    assert "kopf peering \"kubeforge\"" in notes and "Watching:   all namespaces" in notes
    for what in (["deployment", "kf-kubeforge"], ["serviceaccount", SA], ["service", "kf-kubeforge-metrics"],
                 ["poddisruptionbudget", "kf-kubeforge"]):
        cluster.kubectl("get", "-n", release, *what, check=True)
    for what in (["clusterrole", "kf-kubeforge"], ["clusterrolebinding", "kf-kubeforge"],
                 ["clusterkopfpeering", "kubeforge"], ["crd", "kopfpeerings.kopf.dev"],
                 ["crd", "finetunejobs.kubeforge.io"]):
        cluster.kubectl("get", *what, check=True)
    # The Deployment's two replicas are created and scheduled (onto kwok nodes: no image runs).
    wait_for(lambda: len(json.loads(cluster.kubectl(
        "get", "pods", "-n", release, "-l", "app.kubernetes.io/instance=kf", "-o", "json", check=True
    ).stdout)["items"]) == 2, 60, what="2 operator pods")


def test_operator_with_chart_credentials_reconciles_all_three_kinds(cluster, namespace, chart_operator):
    assert "--peering=kubeforge" in chart_operator.args and not any(a.startswith("--namespace")
                                                                    for a in chart_operator.args)
    op = chart_operator("chart-sa-operator")
    try:
        objs = three_kinds()
        cluster.kubectl("apply", "--server-side", "--field-manager=gitops", "-n", namespace, "-f", "-",
                        input=yaml.safe_dump_all(objs), check=True)
        for obj in objs:
            kind, name = obj["kind"], obj["metadata"]["name"]
            wait_for(lambda: accepted(cluster, namespace, kind, name), 60, what=f"{kind} {name} accepted")
            if controller_creates_children(kind):
                wait_for(lambda: children(cluster, namespace, kind, name), 60, what=f"children of {kind} {name}")

        # GitOps: the operator never writes spec. Only the applier owns spec fields of the
        # custom resources; the operator's managers own status and its annotations only.
        for obj in objs:
            live = json.loads(cluster.kubectl("get", obj["kind"].lower(), obj["metadata"]["name"], "-n", namespace,
                                              "--show-managed-fields", "-o", "json", check=True).stdout)
            owners = {m["manager"] for m in live["metadata"]["managedFields"]
                      if "f:spec" in json.dumps(m.get("fieldsV1", {}))}
            assert owners == {"gitops"}, (obj["kind"], live["metadata"]["managedFields"])
            assert len(live["metadata"]["managedFields"]) > 1, "the operator wrote nothing at all"
        # Children are server-side applied by one field manager, "kubeforge".
        for obj in objs:
            for child in children(cluster, namespace, obj["kind"], obj["metadata"]["name"]):
                live = json.loads(cluster.kubectl("get", child, "-n", namespace, "--show-managed-fields", "-o",
                                                  "json", check=True).stdout)
                appliers = {m["manager"] for m in live["metadata"]["managedFields"] if m["operation"] == "Apply"}
                assert appliers == {"kubeforge"}, (child, live["metadata"]["managedFields"])

        # The ports the chart's probes and metrics Service point at answer.
        import urllib.request

        port = {a.split("=")[0]: int(a.split("=")[1]) for a in op.args if a.startswith(("--liveness", "--metrics"))}
        with urllib.request.urlopen(f"http://127.0.0.1:{port['--liveness-port']}/healthz", timeout=5) as rsp:
            assert rsp.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port['--metrics-port']}/metrics", timeout=5) as rsp:
            body = rsp.read().decode()
        assert "process_cpu_seconds_total" in body and "\nkubeforge_" in body  # process and reconciler metrics

        text = op.log()
        assert rbac_denials(text) == [], "the chart's RBAC refused the operator something"
        assert "peering 'kubeforge'" in text  # ran with mandatory peering, as the chart asks
    finally:
        op.stop()


# (verb, resource, where, allowed): `where` is a namespace, "-A" for all namespaces, or None
# for cluster-scoped resources. "NS" is replaced by the test's namespace.
CLUSTER_MATRIX = [
    ("patch", "finetunejobs.kubeforge.io", "-A", True),
    ("watch", "inferenceservices.kubeforge.io", "-A", True),
    ("patch", "quantizejobs.kubeforge.io/status", "NS", True),
    ("create", "jobs.batch", "NS", True),
    ("delete", "deployments.apps", "NS", True),
    ("patch", "horizontalpodautoscalers.autoscaling", "NS", True),
    ("create", "poddisruptionbudgets.policy", "NS", True),
    ("create", "services", "NS", True),
    ("create", "configmaps", "NS", True),
    ("list", "pods", "-A", True),
    ("create", "events", "NS", True),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", None, True),
    ("patch", "clusterkopfpeerings.kopf.dev", None, True),
    # denied
    ("get", "secrets", "-A", False),
    ("list", "secrets", "NS", False),
    ("get", "secrets", "NS", False),
    ("create", "pods/exec", "NS", False),
    ("get", "pods/log", "NS", False),
    ("create", "pods", "NS", False),
    ("delete", "pods", "NS", False),
    ("create", "finetunejobs.kubeforge.io", "NS", False),
    ("delete", "inferenceservices.kubeforge.io", "NS", False),
    ("create", "serviceaccounts/token", "NS", False),
    ("create", "rolebindings.rbac.authorization.k8s.io", "NS", False),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", None, False),
    ("impersonate", "users", None, False),
    ("get", "nodes", None, False),
    ("delete", "namespaces", None, False),
    ("create", "validatingwebhookconfigurations.admissionregistration.k8s.io", None, False),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", None, False),
]


def can_i(cluster, sa: str, verb: str, resource: str, where: str | None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={sa}"]
    if "/" in resource.split(".")[0]:
        base, sub = resource.split("/", 1)
        args = ["auth", "can-i", verb, base, f"--subresource={sub}", f"--as={sa}"]
    if where == "-A":
        args.append("--all-namespaces")
    elif where:
        args += ["-n", where]
    out = cluster.kubectl(*args)
    assert out.stdout.strip() in ("yes", "no"), out.stderr
    return out.stdout.strip() == "yes"


def run_matrix(cluster, sa: str, matrix, namespace: str) -> None:
    rows, wrong = [], []
    for verb, res, where, expected in matrix:
        where = namespace if where == "NS" else where
        got = can_i(cluster, sa, verb, res, where)
        rows.append(f"{verb:12} {res:62} {where or '(cluster)':18} {'yes' if got else 'no'}")
        if got != expected:
            wrong.append(rows[-1] + f"   <- expected {'yes' if expected else 'no'}")
    print("\n".join(rows))
    assert not wrong, "\n".join(wrong)


def test_rbac_matrix_cluster_mode(cluster, release, namespace):
    run_matrix(cluster, f"system:serviceaccount:{release}:{SA}", CLUSTER_MATRIX, namespace)


def test_namespaced_mode_rbac_matrix_and_operator(cluster, namespace, tmp_path, request):
    """rbac.scope=namespaces: full rights in the watched namespace, none anywhere else; and
    the operator, with that release's args and ServiceAccount, reconciles there."""
    ns = f"kubeforge-ns-{uuid.uuid4().hex[:6]}"
    other = f"other-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", other, check=True)
    env = cluster.env()
    helm("install", "kfns", str(CHART), "--namespace", ns, "--create-namespace", "--set", "webhook.enabled=false",
         "--set", "rbac.scope=namespaces", "--set", f"watchNamespaces={{{namespace}}}", env=env)
    try:
        sa = f"system:serviceaccount:{ns}:kfns-kubeforge"
        run_matrix(cluster, sa, [
            ("create", "jobs.batch", namespace, True),
            ("patch", "finetunejobs.kubeforge.io", namespace, True),
            ("patch", "kopfpeerings.kopf.dev", namespace, True),
            ("watch", "customresourcedefinitions.apiextensions.k8s.io", None, True),
            ("list", "namespaces", None, True),
            ("create", "jobs.batch", other, False),
            ("list", "finetunejobs.kubeforge.io", "-A", False),
            ("list", "pods", "-A", False),
            ("get", "configmaps", other, False),
            ("patch", "clusterkopfpeerings.kopf.dev", None, False),
            ("get", "secrets", namespace, False),
            ("create", "pods/exec", namespace, False),
        ], namespace)
        cluster.kubectl("get", "kopfpeering", "kubeforge", "-n", namespace, check=True)

        args, op_env = deployment_command(cluster, ns, "kfns-kubeforge")
        assert f"--namespace={namespace}" in args and "--peering=kubeforge" in args
        log = tmp_path / "operator-namespaced.log"
        request.node._kubeforge_logs = [str(log)]
        op = OperatorAs(local_args(args, free_port), sa_kubeconfig(cluster, ns, "kfns-kubeforge", tmp_path / "sa"),
                        log, env={**op_env, "POD_ID": "namespaced-operator"}).start()
        try:
            objs = three_kinds("-ns")
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objs), check=True)
            for obj in objs:
                kind, name = obj["kind"], obj["metadata"]["name"]
                wait_for(lambda: accepted(cluster, namespace, kind, name), 60, what=f"{kind} {name} accepted")
                if controller_creates_children(kind):
                    wait_for(lambda: children(cluster, namespace, kind, name), 60, what=f"children of {kind} {name}")
            assert rbac_denials(op.log()) == [], "the namespaced Roles refused the operator something"
        finally:
            op.stop()
    finally:
        helm("uninstall", "kfns", "--namespace", ns, "--wait=false", env=env, check=False)
        for n in (ns, other):
            cluster.kubectl("delete", "namespace", n, "--wait=false")


def test_kustomize_base_passes_server_side_dry_run(cluster, namespace, tmp_path):
    """The base as is (namespace "kubeforge"), and an overlay that moves it to another namespace."""
    import os

    from support.chart import REPO

    base = REPO / "deploy" / "kustomize" / "base"
    created = cluster.kubectl("create", "namespace", "kubeforge").returncode == 0
    try:
        rendered = cluster.kubectl("kustomize", str(base), check=True).stdout
        out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        if created:
            cluster.kubectl("delete", "namespace", "kubeforge", "--wait=false")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": namespace,
        "resources": [os.path.relpath(base, overlay)]}))
    rendered = cluster.kubectl("kustomize", str(overlay), check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] != "Namespace"]
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(docs))
    assert out.returncode == 0, out.stdout + out.stderr
    (crb,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert crb["subjects"][0]["namespace"] == namespace
