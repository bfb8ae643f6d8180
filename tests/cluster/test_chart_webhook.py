"""The validating admission webhook, called by the real API server.

The operator (chart ServiceAccount, chart args) serves the webhook with kopf's WebhookServer
on https://127.0.0.1:<port>; the chart's own ValidatingWebhookConfiguration is registered
with only its clientConfig changed from the in-cluster Service (unreachable here: no
kube-proxy) to that URL and a CA made for the test, and scoped to the test's namespace so no
other test is affected. Paths, rules and the failure policy are the chart's.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import uuid

import pytest
import yaml

from support.chart import FINETUNE, accepted, find, render, resource
from support.cluster import free_port
from support.waiting import wait_for

pytestmark = pytest.mark.cluster


def make_cert(d) -> tuple[str, str, str]:
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=webhook-test-ca")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "tls.crt", "-days", "1", "-extfile", "ext")
    return str(d / "ca.crt"), str(d / "tls.crt"), str(d / "tls.key")


def serving(port: int, ca: str) -> bool:
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock, \
            ctx.wrap_socket(sock, server_hostname="127.0.0.1"):
        return True


@pytest.fixture
def webhook(cluster, namespace, chart_operator, tmp_path):
    ca, crt, key = make_cert(tmp_path)
    port = free_port()
    chart_operator("webhook-operator", extra_args=[
        f"--webhook-port={port}", f"--webhook-cert-file={crt}", f"--webhook-key-file={key}", "--webhook-addr=127.0.0.1"])
    wait_for(lambda: serving(port, ca), 60, what="the webhook server")

    (vwc,) = find(render(), "ValidatingWebhookConfiguration")
    vwc["metadata"] = {"name": f"kubeforge-test-{uuid.uuid4().hex[:6]}"}
    ca_bundle = base64.b64encode(open(ca, "rb").read()).decode()
    for hook in vwc["webhooks"]:
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}
        hook["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    cluster.apply_objects([vwc])
    # The API server picks new webhook configurations up asynchronously: wait until it calls us.
    # (A check only the webhook makes: duplicate adapter names are refused by the CRD's CEL now.)
    probe = yaml.safe_dump(resource("InferenceService", "probe", {
        "model": {"uri": "pvc://m/x"}, "template": {"env": [{"name": "HF_TOKEN", "value": "hf_x"}]}}))
    wait_for(lambda: "look like credentials" in cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                                                input=probe).stderr, 30, what="the webhook to be called")
    yield namespace
    cluster.kubectl("delete", "validatingwebhookconfiguration", vwc["metadata"]["name"])


def apply(cluster, namespace, obj, dry_run=False):
    args = ["apply", "-n", namespace, "-f", "-"] + (["--dry-run=server"] if dry_run else [])
    return cluster.kubectl(*args, input=yaml.safe_dump(obj))


def ftj(name: str, output: str) -> dict:
    return resource("FineTuneJob", name, {**FINETUNE, "output": {"uri": output}})


def test_output_collisions_are_rejected(cluster, webhook):
    ns = webhook
    assert apply(cluster, ns, ftj("first", "pvc://models/shared")).returncode == 0
    # kopf's own patches of the object (finalizer, annotations) pass through the webhook too.
    wait_for(lambda: accepted(cluster, ns, "FineTuneJob", "first"), 60, what="first accepted")

    for name, output in (("same", "pvc://models/shared/"), ("inside", "pvc://models/shared/sub")):
        out = apply(cluster, ns, ftj(name, output))
        assert out.returncode != 0, out.stdout
        assert "overlaps pvc://models/shared, written by FineTuneJob first" in out.stderr
    qj = resource("QuantizeJob", "q", {"model": {"uri": "pvc://models/base"}, "output": {"uri": "pvc://models"}})
    out = apply(cluster, ns, qj, dry_run=True)
    assert out.returncode != 0 and "written by FineTuneJob first" in out.stderr
    assert apply(cluster, ns, ftj("elsewhere", "pvc://models/shared-2")).returncode == 0

    # An update that leaves the spec alone is never blocked, even where a check would fail now.
    assert cluster.kubectl("label", "-n", ns, "finetunejob", "first", "team=ml").returncode == 0

    # A Failed job's output may be reused.
    cluster.kubectl("patch", "-n", ns, "finetunejob", "first", "--subresource=status", "--type=merge",
                    "-p", '{"status": {"phase": "Failed"}}', check=True)
    assert apply(cluster, ns, ftj("retry", "pvc://models/shared"), dry_run=True).returncode == 0


def test_references_and_adapters(cluster, webhook):
    ns = webhook
    # A reference to a job that does not exist yet is admitted with a warning (GitOps order).
    qj = resource("QuantizeJob", "q", {"model": {"fineTuneJobRef": {"name": "later"}}, "output": {"uri": "pvc://m/q"}})
    out = apply(cluster, ns, qj)
    assert out.returncode == 0, out.stderr
    assert "Warning: FineTuneJob later does not exist (yet)" in out.stderr

    # A reference to a Failed job can never be satisfied: rejected.
    assert apply(cluster, ns, ftj("broken", "pvc://m/broken")).returncode == 0
    cluster.kubectl("patch", "-n", ns, "finetunejob", "broken", "--subresource=status", "--type=merge",
                    "-p", '{"status": {"phase": "Failed"}}', check=True)
    isvc = resource("InferenceService", "s", {"model": {"fineTuneJobRef": {"name": "broken"}}})
    out = apply(cluster, ns, isvc)
    assert out.returncode != 0 and "FineTuneJob broken has Failed" in out.stderr

    dup = resource("InferenceService", "s", {"model": {"uri": "pvc://m/base"}, "adapters": [
        {"name": "sql", "uri": "pvc://m/a1"}, {"name": "chat", "uri": "pvc://m/a2"}, {"name": "sql", "uri": "pvc://m/a3"}]})
    out = apply(cluster, ns, dup)  # refused by the API server's CEL (the API model's rule), before the webhook
    assert out.returncode != 0 and "spec.adapters: names must be unique; repeated: sql" in out.stderr

    leaked = resource("InferenceService", "s", {"model": {"uri": "pvc://m/base"},
                                                 "template": {"env": [{"name": "HF_TOKEN", "value": "hf_x"}]}})
    out = apply(cluster, ns, leaked)
    assert out.returncode != 0 and "HF_TOKEN look like credentials" in out.stderr, out.stderr

    ok = resource("InferenceService", "s", {"model": {"quantizeJobRef": {"name": "q"}},
                                             "adapters": [{"name": "sql", "uri": "pvc://m/a1"}]})
    out = apply(cluster, ns, ok)
    assert out.returncode == 0 and "Warning" not in out.stderr, out.stderr


def test_workload_policy_is_enforced_at_admission(cluster, webhook):
    """The chart's default workloadPolicy (passed to the operator as env by the Deployment):
    hostPath volumes, an image override and a ServiceAccount are refused, each field named."""
    ns = webhook
    spec = {**FINETUNE, "template": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}],
                                     "image": "evil/image:1", "serviceAccountName": "builder"}}
    out = apply(cluster, ns, resource("FineTuneJob", "escape", spec))
    assert out.returncode != 0, out.stdout
    assert "spec.template.volumes[0] (host): hostPath volumes are not allowed" in out.stderr, out.stderr
    assert "spec.template.image:" in out.stderr and "spec.template.serviceAccountName:" in out.stderr
    assert cluster.kubectl("get", "-n", ns, "finetunejob", "escape").returncode != 0
    safe = {**FINETUNE, "template": {"volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}],
                                     "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}}
    assert apply(cluster, ns, resource("FineTuneJob", "fine", safe), dry_run=True).returncode == 0


def test_chart_certificate_is_installed_and_kept_across_upgrades(cluster):
    """The self-signed pair Helm generates is installed, matches the webhook's caBundle and
    survives `helm upgrade` (lookup), so the API server keeps trusting the running pods.
    Installed in namespaced mode for a namespace no test uses: the webhook's Service cannot be
    reached from this API server, and its Fail policy must not touch other namespaces."""
    from support.chart import CHART, helm

    ns, watched = f"kubeforge-wh-{uuid.uuid4().hex[:6]}", f"unused-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", watched, check=True)
    env = cluster.env()
    values = ["--set", "rbac.scope=namespaces", "--set", f"watchNamespaces={{{watched}}}"]
    helm("install", "kfwh", str(CHART), "-n", ns, "--create-namespace", *values, env=env)
    try:
        def state():
            secret = yaml.safe_load(cluster.kubectl("get", "secret", "kfwh-kubeforge-webhook-tls", "-n", ns, "-o", "yaml",
                                                    check=True).stdout)
            vwc = yaml.safe_load(cluster.kubectl("get", "validatingwebhookconfiguration", f"kfwh-kubeforge-{ns}",
                                                 "-o", "yaml", check=True).stdout)
            return secret["data"], {w["clientConfig"]["caBundle"] for w in vwc["webhooks"]}, vwc

        data, bundles, vwc = state()
        assert bundles == {data["ca.crt"]}
        for hook in vwc["webhooks"]:
            assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == [watched]
        helm("upgrade", "kfwh", str(CHART), "-n", ns, *values, "--set", "verbose=true", env=env)
        data2, bundles2, _ = state()
        assert data2 == data and bundles2 == bundles, "helm upgrade replaced the webhook certificate"
    finally:
        helm("uninstall", "kfwh", "-n", ns, "--wait=false", env=env, check=False)
        for n in (ns, watched):
            cluster.kubectl("delete", "namespace", n, "--wait=false")


SMOLLM = "hf://HuggingFaceTB/SmolLM2-135M-Instruct"


def test_fit_check_refuses_with_a_layout_that_is_then_admitted(cluster, webhook):
    """A full fine-tune of the embedded model that cannot fit a 4 GiB GPU is refused with the
    estimate, the limit and the nearest layout that fits; that layout, applied as the message
    says, is admitted. The same through the nodeSelector's nvidia.com/gpu.memory label, and for
    an InferenceService whose KV cache cannot fit."""
    from kubeforge.fit import apply_changes, suggested_changes

    ns = webhook
    spec = {**FINETUNE, "model": {"uri": SMOLLM}, "method": "full", "resources": {"gpus": 1, "gpuMemory": "4Gi"},
            "dataset": {"uri": "pvc://data/train.jsonl", "sequenceLength": 1024},
            "training": {"microBatchSize": 8, "globalBatchSize": 8}}
    out = apply(cluster, ns, resource("FineTuneJob", "too-big", spec))
    assert out.returncode != 0, out.stdout
    assert "spec.resources: this layout does not fit: estimated peak" in out.stderr, out.stderr
    assert "exceeds 4.00 GiB (resources.gpuMemory 4Gi)" in out.stderr and "the nearest layout that fits" in out.stderr
    changes = suggested_changes(out.stderr.strip().rstrip("\n"))
    assert changes, out.stderr
    fixed = apply_changes(spec, changes)
    out = apply(cluster, ns, resource("FineTuneJob", "fits", fixed))
    assert out.returncode == 0, out.stderr

    by_label = {**spec, "resources": {"gpus": 1}, "template": {"nodeSelector": {"nvidia.com/gpu.memory": "4096"}}}
    out = apply(cluster, ns, resource("FineTuneJob", "too-big-label", by_label), dry_run=True)
    assert out.returncode != 0 and "nvidia.com/gpu.memory=4096 MiB" in out.stderr, out.stderr

    # A model the webhook cannot know is admitted, with a warning saying the preflight checks it.
    unknown = {**spec, "model": {"uri": "hf://acme/unknown"}, "output": {"uri": "pvc://models/unknown"}}
    out = apply(cluster, ns, resource("FineTuneJob", "unknown", unknown), dry_run=True)
    assert out.returncode == 0 and "fit not checked at admission" in out.stderr, out.stderr

    serve = {"model": {"uri": SMOLLM}, "resources": {"gpus": 1, "gpuMemory": "1Gi"}}
    out = apply(cluster, ns, resource("InferenceService", "kv-too-big", serve))
    assert out.returncode != 0 and "spec.engine: this engine does not fit" in out.stderr, out.stderr
    fixed_serve = apply_changes(serve, suggested_changes(out.stderr.strip()))
    assert apply(cluster, ns, resource("InferenceService", "kv-fits", fixed_serve), dry_run=True).returncode == 0
