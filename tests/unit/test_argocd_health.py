"""Argo CD health checks (deploy/argocd/*.lua) run against sample statuses.

The scripts run in Lua 5.1 (lupa's lua51 module), the dialect of Argo CD's gopher-lua, with
the object as the global ``obj`` exactly as Argo CD passes it. Sample statuses are built from
the API's status models (``to_api()``), so a renamed status field breaks these tests rather
than silently turning every resource "Progressing". docs/argocd-health.md must carry the
scripts verbatim.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

lua51 = pytest.importorskip("lupa.lua51", reason="lupa (dev dependency) runs the Argo CD Lua")

from kubeforge.api.finetune import FineTuneJobStatus  # noqa: E402
from kubeforge.api.inference import InferenceServiceStatus  # noqa: E402
from kubeforge.api.quantize import QuantizeJobStatus  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "deploy" / "argocd"
T = "2026-01-01T00:00:00Z"


def cond(type_, status, reason="R", message=""):
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": T}


def health(kind: str, status: dict | None, generation: int = 1) -> tuple[str, str]:
    rt = lua51.LuaRuntime(unpack_returned_tuples=True)
    obj = {"apiVersion": "kubeforge.io/v1alpha1", "kind": kind,
           "metadata": {"name": "x", "namespace": "ml", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = status
    rt.globals().obj = rt.table_from(obj, recursive=True)
    hs = rt.execute((SCRIPTS / f"{kind.lower()}.lua").read_text())
    assert hs["status"] in ("Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown")
    return hs["status"], hs["message"]


def ft(**kw):
    return FineTuneJobStatus.model_validate({"observedGeneration": 1, **kw}).to_api()


def qj(**kw):
    return QuantizeJobStatus.model_validate({"observedGeneration": 1, **kw}).to_api()


def isvc(**kw):
    return InferenceServiceStatus.model_validate({"observedGeneration": 1, **kw}).to_api()


@pytest.mark.parametrize("kind", ["FineTuneJob", "QuantizeJob", "InferenceService"])
def test_no_status_or_stale_generation_is_progressing(kind):
    assert health(kind, None) == ("Progressing", "Waiting for the KubeForge operator")
    status, message = health(kind, {"observedGeneration": 1, "phase": "Succeeded",
                                     "conditions": [cond("Ready", "True")]}, generation=2)
    assert status == "Progressing" and "generation 2" in message


@pytest.mark.parametrize("kind", ["FineTuneJob", "QuantizeJob", "InferenceService"])
def test_rejected_spec_is_degraded(kind):
    status = {"observedGeneration": 1, "phase": "Pending",
              "conditions": [cond("Accepted", "False", "InvalidSpec", "spec.nodes.min: must be <= max")]}
    assert health(kind, status) == ("Degraded", "Spec rejected: spec.nodes.min: must be <= max")


def test_finetunejob():
    running = ft(phase="Running", conditions=[cond("Accepted", "True")],
                 progress={"step": 40, "totalSteps": 100, "loss": 1.234567})
    assert health("FineTuneJob", running) == ("Progressing", "Running: step 40/100, loss 1.2346")
    assert health("FineTuneJob", ft(phase="Pending")) == ("Progressing", "Pending")
    gating = ft(phase="Pending", conditions=[cond("DataChecked", "Unknown", "DataCheckRunning",
                                                  "checking spec.dataset.checks on the training data")])
    assert health("FineTuneJob", gating) == ("Progressing", "Pending: checking spec.dataset.checks on the training data")
    gated = ft(phase="Failed", conditions=[cond("Failed", "True", "DataQualityFailed", "minRecords: records 9 ...")])
    assert health("FineTuneJob", gated) == ("Degraded", "Failed: minRecords: records 9 ...")
    assert health("FineTuneJob", ft(phase="Restarting"))[0] == "Progressing"
    assert health("FineTuneJob", ft(phase="Suspended")) == ("Suspended", "Suspended")
    done = ft(phase="Succeeded", output={"uri": "pvc://models/out"}, conditions=[cond("Succeeded", "True")])
    assert health("FineTuneJob", done) == ("Healthy", "Succeeded: pvc://models/out")
    failed = ft(phase="Failed", conditions=[cond("Failed", "True", "BackoffLimitExceeded", "3 worker failures")])
    assert health("FineTuneJob", failed) == ("Degraded", "Failed: 3 worker failures")


def test_quantizejob():
    done = qj(phase="Succeeded", result={"compressionRatio": 2.7, "gatePassed": True})
    assert health("QuantizeJob", done) == ("Healthy", "Succeeded: 2.70x smaller")
    gate = qj(phase="Failed", result={"gatePassed": False, "perplexityIncreasePercent": 3.5})
    assert health("QuantizeJob", gate) == ("Degraded", "Failed: quality gate missed (perplexity +3.50%)")
    crashed = qj(phase="Failed", conditions=[cond("Failed", "True", "PodFailed", "OOMKilled")])
    assert health("QuantizeJob", crashed) == ("Degraded", "Failed: OOMKilled")
    waiting = qj(phase="WaitingForInput", conditions=[cond("InputReady", "False", "Waiting", "FineTuneJob ft is Running")])
    assert health("QuantizeJob", waiting) == ("Progressing", "Waiting for its input model: FineTuneJob ft is Running")
    assert health("QuantizeJob", qj(phase="Running")) == ("Progressing", "Running")


def test_inferenceservice():
    serving = isvc(phase="Running", url="http://s.ml.svc:8000/v1", replicas={"ready": 2, "desired": 2},
                   conditions=[cond("Accepted", "True"), cond("Ready", "True")])
    assert health("InferenceService", serving) == ("Healthy", "Serving at http://s.ml.svc:8000/v1 (2/2 replicas ready)")
    starting = isvc(phase="Pending", replicas={"ready": 0, "desired": 1}, conditions=[cond("Ready", "False")])
    assert health("InferenceService", starting) == ("Progressing", "Pending: 0/1 replicas ready")
    waiting = isvc(phase="WaitingForInput", conditions=[cond("ModelReady", "False", "Waiting", "QuantizeJob q is Running")])
    assert health("InferenceService", waiting) == ("Progressing", "Waiting for its model: QuantizeJob q is Running")
    failed = isvc(phase="Failed", conditions=[cond("Ready", "False", "ModelFailed", "QuantizeJob q failed")])
    assert health("InferenceService", failed) == ("Degraded", "Failed: QuantizeJob q failed")


def test_docs_and_configmap_patch_carry_the_scripts_verbatim():
    import yaml

    doc = (REPO / "docs" / "argocd-health.md").read_text()
    patch = yaml.safe_load((SCRIPTS / "argocd-cm-patch.yaml").read_text())
    for kind in ("FineTuneJob", "QuantizeJob", "InferenceService"):
        script = (SCRIPTS / f"{kind.lower()}.lua").read_text()
        assert patch["data"][f"resource.customizations.health.kubeforge.io_{kind}"] == script, kind
        blocks = re.findall(r"```lua\n(.*?)```", doc, re.S)
        assert script in blocks, f"docs/argocd-health.md does not show deploy/argocd/{kind.lower()}.lua verbatim"
