"""How the webhook behaves in operation (issue 17): certificate renewal without a restart,
no call for updates that leave the spec alone, no LIST per review.

The operator (chart ServiceAccount, chart args) serves the webhook on https://127.0.0.1:<port>
as in test_chart_webhook.py; the chart's ValidatingWebhookConfiguration (its rules, its
matchConditions, failurePolicy Fail) is registered with only the clientConfig pointed there
and the namespaceSelector narrowed to the test's namespace.
"""

from __future__ import annotations

import base64
import re
import shutil
import ssl
import socket
import time
import uuid
from pathlib import Path

import pytest
import yaml

from support.chart import FINETUNE, find, render, resource
from support.cluster import free_port
from support.waiting import wait_for
from test_chart_webhook import make_cert, serving

pytestmark = pytest.mark.cluster


def served_certificate(port: int) -> str:
    """The certificate the server presents now, PEM (not verified: just looked at)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock, ctx.wrap_socket(sock) as tls:
        der = tls.getpeercert(binary_form=True)
    return ssl.DER_cert_to_PEM_cert(der)


def register(cluster, namespace: str, port: int, ca: str) -> str:
    (vwc,) = find(render(), "ValidatingWebhookConfiguration")
    name = f"kubeforge-ops-{uuid.uuid4().hex[:6]}"
    vwc["metadata"] = {"name": name}
    bundle = base64.b64encode(open(ca, "rb").read()).decode()
    for hook in vwc["webhooks"]:
        hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{hook['clientConfig']['service']['path']}",
                                "caBundle": bundle}
        hook["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
        assert hook["failurePolicy"] == "Fail"
    cluster.apply_objects([vwc])
    probe = yaml.safe_dump(resource("InferenceService", "probe", {
        "model": {"uri": "pvc://m/x"}, "template": {"env": [{"name": "HF_TOKEN", "value": "hf_x"}]}}))
    wait_for(lambda: "look like credentials" in cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                                                input=probe).stderr, 30, what="the webhook to be called")
    return name


@pytest.fixture
def served(cluster, namespace, chart_operator, tmp_path):
    """(operator, port, cert dir): the webhook served from files in ``tmp_path/live``."""
    first = tmp_path / "first"
    first.mkdir()
    ca, _crt, _key = make_cert(first)
    live = tmp_path / "live"
    live.mkdir()
    for f in ("tls.crt", "tls.key"):
        shutil.copy(first / f, live / f)
    port = free_port()
    op = chart_operator("webhook-ops", extra_args=[
        f"--webhook-port={port}", f"--webhook-cert-file={live / 'tls.crt'}", f"--webhook-key-file={live / 'tls.key'}",
        "--webhook-addr=127.0.0.1", "--webhook-cert-check-seconds=1"])
    wait_for(lambda: serving(port, ca), 60, what="the webhook server")
    name = register(cluster, namespace, port, ca)
    yield op, port, tmp_path
    cluster.kubectl("delete", "validatingwebhookconfiguration", name)


def test_a_renewed_certificate_is_served_without_a_restart(cluster, namespace, served):
    op, port, d = served
    before = served_certificate(port)
    second = d / "second"
    second.mkdir()
    ca2, crt2, key2 = make_cert(second)  # a new CA and a new key: what a rotation with a new CA looks like
    # Replace the files the way the kubelet updates a mounted Secret: new files, then one rename.
    staged = d / "live.new"
    staged.mkdir()
    shutil.copy(crt2, staged / "tls.crt")
    shutil.copy(key2, staged / "tls.key")
    for f in ("tls.key", "tls.crt"):
        (staged / f).replace(d / "live" / f)
    renewed_at = time.monotonic()
    wait_for(lambda: serving(port, ca2), 15, interval=0.2, what="the renewed certificate to be served")
    print(f"\n[webhook] renewed certificate served {time.monotonic() - renewed_at:.1f} s after the files changed")
    assert served_certificate(port) != before
    assert op.proc.poll() is None, "the operator restarted (or died) to pick the certificate up"


def test_updates_that_leave_the_spec_alone_skip_the_webhook(cluster, namespace, served):
    op, _port, _d = served
    ftj = resource("FineTuneJob", "meta", {**FINETUNE, "output": {"uri": "pvc://models/meta"}})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(ftj), check=True)
    op.stop()  # no replica answers now, and the policy is Fail
    assert op.proc.poll() is not None

    # Metadata-only edits (labels, annotations: what kopf and GitOps tools do all day) and
    # status writes still go through: matchConditions keep them away from the webhook.
    out = cluster.kubectl("label", "-n", namespace, "finetunejob", "meta", "team=ml")
    assert out.returncode == 0, out.stderr
    out = cluster.kubectl("annotate", "-n", namespace, "finetunejob", "meta", "example.com/note=x")
    assert out.returncode == 0, out.stderr
    out = cluster.kubectl("patch", "-n", namespace, "finetunejob", "meta", "--subresource=status", "--type=merge",
                          "-p", '{"status": {"phase": "Pending"}}')
    assert out.returncode == 0, out.stderr
    # A spec change is still reviewed, so with nobody answering it is refused (Fail).
    out = cluster.kubectl("patch", "-n", namespace, "finetunejob", "meta", "--type=merge",
                          "-p", '{"spec": {"suspend": true}}')
    assert out.returncode != 0 and "failed calling webhook" in out.stderr, out.stderr


LIST_LINE = re.compile(r'^apiserver_request_total\{([^}]*)\} (\S+)$', re.M)


def lists_of(cluster, resource_name: str) -> float:
    """LIST requests of ``resource_name`` the API server has answered so far (its own metrics)."""
    text = cluster.kubectl("get", "--raw", "/metrics", check=True).stdout
    total = 0.0
    for labels, value in LIST_LINE.findall(text):
        if f'resource="{resource_name}"' in labels and 'verb="LIST"' in labels:
            total += float(value)
    return total


def test_reviews_read_a_watch_cache_not_a_list_each(cluster, namespace, served):
    def review(i: int) -> None:
        obj = resource("FineTuneJob", f"r{i}", {**FINETUNE, "output": {"uri": f"pvc://models/r{i}"}})
        out = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj))
        assert out.returncode == 0, out.stderr

    review(0)  # the first review in a namespace starts its informers (one LIST each)
    time.sleep(1)
    before = {r: lists_of(cluster, r) for r in ("finetunejobs", "quantizejobs")}
    for i in range(1, 11):
        review(i)
    after = {r: lists_of(cluster, r) for r in ("finetunejobs", "quantizejobs")}
    print(f"\n[webhook] LISTs during 10 reviews: {({r: after[r] - before[r] for r in after})}")
    # The metric counts every client of this shared cluster: another test's operator whose
    # watch expired re-lists at any moment (seen once in CI: one LIST of each kind during the
    # ten reviews). A webhook that listed per review would add at least ten of each.
    assert all(after[r] - before[r] <= 2 for r in after), "reviews still LIST the jobs of the namespace"

    # The cache still sees what happens: a job created now collides with the next review at once.
    first = resource("FineTuneJob", "owner", {**FINETUNE, "output": {"uri": "pvc://models/taken"}})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(first), check=True)
    clash = resource("FineTuneJob", "clash", {**FINETUNE, "output": {"uri": "pvc://models/taken/sub"}})
    wait_for(lambda: "written by FineTuneJob owner" in cluster.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(clash)).stderr,
        5, interval=0.2, what="the cache to see the new job")
