"""``spec.template`` pass-through rules (issue 17): what the API refuses everywhere, what the
platform's workload policy refuses unless widened, and that every layer names the field.

* Static rules live in the API model (pydantic, so ``kubeforge validate`` and the SDK) and, as
  CEL, in the CRDs (the real API server's side: tests/cluster/test_workload_policy.py):
  interpreter/loader env (``LD_*``, ``PYTHONPATH``, ...), AppArmor/seccomp annotations, and
  (pydantic only: the volumes are schemaless) projected ServiceAccount tokens.
* The configurable policy (:mod:`kubeforge.api.policy`: volume types, image,
  serviceAccountName) is applied by the webhook handlers and by the reconcile loop, whose
  refusal is ``Accepted=False/InvalidSpec`` with nothing stepped (no child created).
"""

from __future__ import annotations

import kopf
import pytest
from pydantic import ValidationError

from kubeforge import kube
from kubeforge.api import FineTuneJobSpec, InferenceServiceSpec, QuantizeJob, QuantizeJobSpec
from kubeforge.api import policy
from kubeforge.api.crd import all_crds
from kubeforge.controllers import quantize_status, webhooks
from kubeforge.controllers.reconcile import Reconciler
from kubeforge_runtime import contract

FTJ = {"model": {"uri": "hf://a/b"}, "dataset": {"uri": "pvc://d/t.jsonl"}, "output": {"uri": "pvc://m/o"}}
SPECS = [(FineTuneJobSpec, FTJ), (QuantizeJobSpec, {"model": {"uri": "s3://b/base"}, "output": {"uri": "s3://b/q"}}),
         (InferenceServiceSpec, {"model": {"uri": "pvc://m/base"}})]
DEFAULT = policy.WorkloadPolicy()


def refused(spec_model, base, template) -> str:
    with pytest.raises(ValidationError) as exc:
        spec_model.model_validate({**base, "template": template})
    return str(exc.value)


# --- static: the API model ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONPATH", "PYTHONSTARTUP",
                                  "PYTHONHOME", "PYTHONWARNINGS", "BASH_ENV"])
@pytest.mark.parametrize("spec_model,base", SPECS, ids=lambda x: getattr(x, "__name__", ""))
def test_interpreter_env_is_refused_naming_the_variable(spec_model, base, name):
    msg = refused(spec_model, base, {"env": [{"name": name, "value": "/tmp/x.so"}]})
    assert f"template.env: {name} changes which code the interpreter" in msg and "remove it" in msg


def test_ordinary_env_and_lookalikes_pass():
    spec = FineTuneJobSpec.model_validate({**FTJ, "template": {"env": [
        {"name": n, "value": "1"} for n in ("NCCL_DEBUG", "PYTHONHASHSEED", "OLD_PRELOAD", "HF_HUB_OFFLINE")]}})
    assert len(spec.template.env) == 4
    assert not contract.interpreter_env("MY_LD_PRELOAD") and contract.interpreter_env("LD_BIND_NOW")


@pytest.mark.parametrize("key", ["container.apparmor.security.beta.kubernetes.io/trainer",
                                 "seccomp.security.alpha.kubernetes.io/pod",
                                 "container.seccomp.security.alpha.kubernetes.io/trainer"])
def test_security_profile_annotations_are_refused_naming_the_key(key):
    msg = refused(FineTuneJobSpec, FTJ, {"annotations": {key: "unconfined"}})
    assert f"template.annotations: {key} selects an AppArmor/seccomp profile" in msg


def test_projected_service_account_token_is_refused_by_the_model():
    vol = {"name": "tok", "projected": {"sources": [{"configMap": {"name": "c"}},
                                                    {"serviceAccountToken": {"path": "token"}}]}}
    msg = refused(InferenceServiceSpec, {"model": {"uri": "pvc://m/base"}}, {"volumes": [vol]})
    assert "template.volumes[0] (tok): a projected serviceAccountToken" in msg


@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["metadata"]["name"])
def test_static_rules_are_cel_in_every_crd(crd):
    text = str(crd)
    assert "self.name.startsWith('LD_')" in text and "'PYTHONPATH'" in text and "'PYTHONSTARTUP'" in text
    assert "k.startsWith('container.apparmor.security.beta.kubernetes.io')" in text


# --- configurable: the workload policy ------------------------------------------------------------
@pytest.mark.parametrize("volume,kind", [
    ({"name": "host", "hostPath": {"path": "/var/run"}}, "hostPath"),
    ({"name": "share", "nfs": {"server": "nfs.example", "path": "/x"}}, "nfs"),
    ({"name": "disk", "iscsi": {"targetPortal": "1.2.3.4", "iqn": "iqn.x", "lun": 0}}, "iscsi"),
    ({"name": "inline", "csi": {"driver": "x"}}, "csi"),
])
def test_unsafe_volume_types_are_refused_naming_the_volume_and_the_chart_value(volume, kind):
    safe = {"name": "data", "persistentVolumeClaim": {"claimName": "d"}}
    (msg,) = policy.problems({"volumes": [safe, volume]}, DEFAULT)
    assert msg.startswith(f"spec.template.volumes[1] ({volume['name']}): {kind} volumes are not allowed")
    assert "workloadPolicy.allowedVolumeTypes" in msg


def test_default_policy_allows_the_namespace_s_own_storage():
    volumes = [
        {"name": "a", "persistentVolumeClaim": {"claimName": "d"}},
        {"name": "b", "configMap": {"name": "c"}},
        {"name": "c", "secret": {"secretName": "s"}},
        {"name": "d", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "e", "downwardAPI": {"items": []}},
        {"name": "f", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
        {"name": "g", "projected": {"sources": [{"configMap": {"name": "c"}}]}},
    ]
    assert policy.problems({"volumes": volumes, "env": [{"name": "X", "value": "1"}]}, DEFAULT) == []


def test_emptydir_needs_a_size_limit_and_a_volume_one_source():
    msgs = policy.problems({"volumes": [{"name": "s", "emptyDir": {}}, {"name": "two", "secret": {}, "configMap": {}}]},
                           DEFAULT)
    assert msgs[0].startswith("spec.template.volumes[0] (s): an emptyDir needs a sizeLimit")
    assert msgs[1].startswith("spec.template.volumes[1] (two): a volume sets exactly one source")


def test_image_and_service_account_are_refused_unless_allowed():
    tmpl = {"image": "evil/image:1", "serviceAccountName": "cloud-admin"}
    msgs = policy.problems(tmpl, DEFAULT)
    assert [m.split(":")[0] for m in msgs] == ["spec.template.image", "spec.template.serviceAccountName"]
    assert "workloadPolicy.allowImageOverride=true" in msgs[0]
    assert "workloadPolicy.allowServiceAccount=true" in msgs[1]
    wide = policy.WorkloadPolicy(allow_image_override=True, allow_service_account=True)
    assert policy.problems(tmpl, wide) == []


def test_policy_from_env_defaults_and_widening():
    assert policy.from_env({}) == DEFAULT
    wide = policy.from_env({policy.ENV_ALLOWED_VOLUME_TYPES: "hostPath, nfs", policy.ENV_ALLOW_IMAGE_OVERRIDE: "true",
                            policy.ENV_ALLOW_SERVICE_ACCOUNT: "1"})
    assert wide == policy.WorkloadPolicy(frozenset({"hostPath", "nfs"}), True, True)
    assert policy.problems({"volumes": [{"name": "h", "hostPath": {"path": "/d"}}]}, wide) == []
    # Set but empty: no volume type at all.
    assert policy.from_env({policy.ENV_ALLOWED_VOLUME_TYPES: ""}).allowed_volume_types == frozenset()
    with pytest.raises(ValueError, match="not a boolean"):
        policy.from_env({policy.ENV_ALLOW_IMAGE_OVERRIDE: "maybe"})


# --- who applies it -----------------------------------------------------------------------------------
HOSTPATH = {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}


def body(kind: str, spec: dict) -> dict:
    return {"kind": kind, "metadata": {"name": "x", "namespace": "ns"}, "spec": spec}


@pytest.mark.parametrize("handler,kind,spec", [
    (webhooks.validate_finetunejob, "FineTuneJob", FTJ),
    (webhooks.validate_quantizejob, "QuantizeJob", SPECS[1][1]),
    (webhooks.validate_inferenceservice, "InferenceService", SPECS[2][1]),
])
def test_webhook_refuses_what_the_policy_refuses(monkeypatch, handler, kind, spec):
    monkeypatch.setattr(kube, "list_", lambda *a, **k: [])
    monkeypatch.setattr(kube, "get", lambda *a, **k: None)
    monkeypatch.delenv(policy.ENV_ALLOWED_VOLUME_TYPES, raising=False)
    b = body(kind, {**spec, "template": {**HOSTPATH, "image": "x/y:1"}})
    with pytest.raises(kopf.AdmissionError) as exc:
        handler(body=b, old=None, new=b, operation="CREATE", warnings=[])
    assert "spec.template.volumes[0] (host): hostPath" in str(exc.value)
    assert "spec.template.image" in str(exc.value) and exc.value.code == 422
    # Widened by the platform (the chart passes these variables): admitted.
    monkeypatch.setenv(policy.ENV_ALLOWED_VOLUME_TYPES, "hostPath")
    monkeypatch.setenv(policy.ENV_ALLOW_IMAGE_OVERRIDE, "true")
    handler(body=b, old=None, new=b, operation="CREATE", warnings=[])


def test_operator_rejects_a_policy_violation_before_any_step(monkeypatch):
    """For clusters without the webhook: Accepted=False/InvalidSpec naming the field, no step, no after."""
    obj = {"apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob",
           "metadata": {"name": "q", "namespace": "ns", "uid": "u", "generation": 1, "resourceVersion": "1"},
           "spec": {**SPECS[1][1], "template": {"env": [{"name": "A", "value": "1"}],
                                                "serviceAccountName": "admin"}}}
    writes: list[dict] = []
    monkeypatch.setattr(kube, "get", lambda *a, **k: obj)
    monkeypatch.setattr(kube, "patch_merge", lambda kind, ns, name, patch, subresource=None: writes.append(patch))
    monkeypatch.setattr(kube, "create", lambda *a, **k: None)
    monkeypatch.delenv(policy.ENV_ALLOW_SERVICE_ACCOUNT, raising=False)
    steps: list[dict] = []
    afters: list[tuple] = []
    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=lambda *a, **k: steps.append(k),
                   after=lambda *a: afters.append(a))
    r.request("ns", "q", apply=True)
    (cond,) = writes[0]["status"]["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Accepted", "False", "InvalidSpec")
    assert cond["message"].startswith("spec.template.serviceAccountName: this cluster does not let workloads")
    assert steps == [] and afters == []  # neither step nor after: nothing is created
    r.forget("ns", "q")
