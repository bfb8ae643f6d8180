"""FineTuneJob ``method: distill``: the API rules, the teacher reference, the admission checks.

* the rules (pydantic and the CRD's CEL): ``distillation`` with ``method: distill`` and only
  then, exactly one of ``teacher.uri`` / ``teacher.fineTuneJobRef``, bounds of temperature and alpha;
* the teacher ``fineTuneJobRef`` is resolved like a QuantizeJob's model reference
  (``controllers/references.py``): the job waits (Pending, InputReady=False/WaitingForInput)
  and creates nothing; it fails with InputFailed when the teacher failed; once the teacher
  has succeeded, its ``status.output.uri`` is what the trainer's config and volumes get.
  The reconciler's step runs against an in-memory API (``kube.get``/``list_``/apply patched:
  the one stand-in here, for the reads and applies a cluster test would make);
* the webhook refuses a teacher that can never be one (itself, Failed, an adapter output).
"""

from __future__ import annotations

import json
from typing import Any

import kopf
import pytest
from pydantic import ValidationError

from kubeforge import kube
from kubeforge.api import FineTuneJobSpec
from kubeforge.builders import finetune as fb
from kubeforge.controllers import finetune as controller
from kubeforge.controllers import finetune_status, webhooks
from kubeforge.controllers.references import resolve
from support.crds import cel_rules
from kubeforge_runtime import contract

FTJ = {"model": {"uri": "hf://a/b"}, "dataset": {"uri": "pvc://d/t.jsonl"}, "output": {"uri": "pvc://m/o"}}
DISTILL = {**FTJ, "method": "distill", "distillation": {"teacher": {"fineTuneJobRef": {"name": "big"}}}}


# --- the rules ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ({**FTJ, "method": "distill"}, "method distill needs spec.distillation"),
    ({**DISTILL, "method": "full"}, "method distill needs spec.distillation"),
    ({**DISTILL, "distillation": {"teacher": {}}}, "give exactly one of uri or fineTuneJobRef"),
    ({**DISTILL, "distillation": {"teacher": {"uri": "hf://a/t", "fineTuneJobRef": {"name": "big"}}}},
     "give exactly one of uri or fineTuneJobRef"),
    ({**DISTILL, "distillation": {"teacher": {"uri": "hf://a/t"}, "alpha": 1.5}}, "alpha"),
    ({**DISTILL, "distillation": {"teacher": {"uri": "hf://a/t"}, "temperature": 0}}, "temperature"),
])
def test_distillation_rules_are_refused_by_the_model(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FineTuneJobSpec.model_validate(spec)


def test_distillation_rules_are_in_the_crd() -> None:
    text = cel_rules("FineTuneJob")
    assert "(self.method == 'distill') == has(self.distillation)" in text
    assert "distillation.teacher: give exactly one of uri or fineTuneJobRef" in text
    spec = FineTuneJobSpec.model_validate(DISTILL)
    assert spec.distillation.temperature == 2.0 and spec.distillation.alpha == 0.5


# --- the teacher reference --------------------------------------------------------------------------

def _teacher(phase: str, output: str | None = "pvc://models/big-out", fmt: str = "merged") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if output:
        status["output"] = {"uri": output}
    if phase == "Failed":
        status["conditions"] = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "oom"}]
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "big", "namespace": "ns", "uid": "t-uid"},
            "spec": {**FTJ, "output": {"uri": "pvc://models/big-out", "format": fmt}}, "status": status}


def _student() -> dict[str, Any]:
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "small", "namespace": "ns", "uid": "s-uid", "generation": 1, "resourceVersion": "1"},
            "spec": DISTILL}


class FakeAPI:
    """In-memory objects by (kind, name) for the controller's reads and applies (see the module docstring)."""

    def __init__(self, teacher: dict[str, Any] | None) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        if teacher is not None:
            self.objects[("FineTuneJob", "big")] = teacher
        self.applied: list[dict[str, Any]] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, name))

    def list_(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        return []

    def apply(self, owner: dict[str, Any], children: list[dict[str, Any]], *, fresh: bool = False) -> list[dict[str, Any]]:
        for child in children:
            self.applied.append(child)
            self.objects[(child["kind"], child["metadata"]["name"])] = {**child, "status": {}}
        return [self.objects[(c["kind"], c["metadata"]["name"])] for c in children]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(teacher: dict[str, Any] | None) -> FakeAPI:
        fake = FakeAPI(teacher)
        monkeypatch.setattr(kube, "get", fake.get)
        monkeypatch.setattr(kube, "list_", fake.list_)
        monkeypatch.setattr(controller, "apply_owned", fake.apply)
        monkeypatch.setattr(controller, "network_policy_settings", lambda: type("S", (), {"enabled": False})())
        return fake

    return install


@pytest.mark.parametrize("teacher", [None, _teacher("Running", output=None)])
def test_job_waits_for_its_teacher_and_creates_nothing(api: Any, teacher: dict[str, Any] | None) -> None:
    fake = api(teacher)
    obj = _student()
    out = controller._step(obj, FineTuneJobSpec.model_validate(obj["spec"]), apply=True)
    assert fake.applied == []
    assert out.status["phase"] == "Pending"
    cond = {c["type"]: c for c in out.status["conditions"]}
    assert cond["InputReady"]["status"] == "False" and cond["InputReady"]["reason"] == "WaitingForInput"
    assert "FineTuneJob big" in cond["InputReady"]["message"]
    assert cond["Created"]["status"] == "False"


def test_job_fails_when_its_teacher_failed(api: Any) -> None:
    fake = api(_teacher("Failed", output=None))
    obj = _student()
    out = controller._step(obj, FineTuneJobSpec.model_validate(obj["spec"]), apply=True)
    assert fake.applied == [] and out.status["phase"] == "Failed"
    cond = {c["type"]: c for c in out.status["conditions"]}
    assert cond["Failed"]["reason"] == "InputFailed" and "oom" in cond["Failed"]["message"]


def test_a_succeeded_teacher_is_resolved_into_the_trainer_config(api: Any) -> None:
    fake = api(_teacher("Succeeded"))
    obj = _student()
    # A scheduled sync (the teacher's event fanned out), not a spec handler: it still creates the children.
    out = controller._step(obj, FineTuneJobSpec.model_validate(obj["spec"]), apply=False)
    kinds = [c["kind"] for c in fake.applied]
    assert kinds == ["Service", "ConfigMap", "Job"]
    config = json.loads(fake.applied[1]["data"][contract.CONFIG_FILE])
    assert config["method"] == "distill"
    assert config["distillation"] == {"teacher": {"uri": "pvc://models/big-out"}, "temperature": 2.0, "alpha": 0.5}
    # The teacher's claim is mounted like the model's.
    claims = {v["persistentVolumeClaim"]["claimName"] for v in fake.applied[2]["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert "models" in claims
    cond = {c["type"]: c for c in out.status["conditions"]}
    assert cond["InputReady"]["status"] == "True" and cond["InputReady"]["reason"] == "InputReady"
    assert out.status["phase"] == "Pending"  # children created, no workers yet


def test_a_teacher_uri_needs_no_resolution() -> None:
    spec = FineTuneJobSpec.model_validate({**DISTILL, "distillation": {"teacher": {"uri": "pvc://models/t"}}})
    assert controller.teacher_resolution(spec, "ns") is None
    cfg = fb.render_config("small", "ns", spec)
    assert cfg["distillation"]["teacher"] == {"uri": "pvc://models/t"}


def test_status_of_a_waiting_job_is_pure() -> None:
    obj = _student()
    res = resolve("FineTuneJob", "big", None)
    out = finetune_status.compute(obj, spec=FineTuneJobSpec.model_validate(obj["spec"]), job=None, pods=[], counted=[],
                                  progress=None, now="2026-12-01T00:00:00Z", teacher=res)
    assert out.status["phase"] == "Pending"
    assert [e.reason for e in out.events if e.reason == "WaitingForInput"] == ["WaitingForInput"]


# --- the webhook ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher, name, message", [
    (None, "big", "cannot be its own teacher"),
    (_teacher("Succeeded", fmt="adapter"), "small", "writes a LoRA adapter"),
    (_teacher("Failed"), "small", "has Failed"),
])
def test_webhook_refuses_a_teacher_that_cannot_be_one(monkeypatch: pytest.MonkeyPatch, teacher: Any, name: str,
                                                      message: str) -> None:
    monkeypatch.setattr(kube, "list_", lambda *a, **k: [])
    monkeypatch.setattr(kube, "get", lambda kind, ns, n: teacher if n == "big" else None)
    body = {"kind": "FineTuneJob", "metadata": {"name": name, "namespace": "ns"}, "spec": DISTILL}
    with pytest.raises(kopf.AdmissionError, match=message) as exc:
        webhooks.validate_finetunejob(body=body, old=None, new=body, operation="CREATE", warnings=[])
    assert "spec.distillation.teacher.fineTuneJobRef" in str(exc.value)


def test_webhook_admits_a_teacher_that_does_not_exist_yet_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "list_", lambda *a, **k: [])
    monkeypatch.setattr(kube, "get", lambda *a, **k: None)
    body = {"kind": "FineTuneJob", "metadata": {"name": "small", "namespace": "ns"}, "spec": DISTILL}
    warnings: list[str] = []
    webhooks.validate_finetunejob(body=body, old=None, new=body, operation="CREATE", warnings=warnings)
    assert warnings and "FineTuneJob big does not exist (yet)" in warnings[0]
