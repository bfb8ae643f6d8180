"""``spec.template`` pass-through rules (issue 17): what the API refuses everywhere, naming the field.

Static rules live in the API model (pydantic, so ``kubeforge validate`` and the SDK) and, as
CEL, in the CRDs: interpreter/loader env (``LD_*``, ``PYTHONPATH``, ...), AppArmor/seccomp
annotations, and (pydantic only: the volumes are schemaless) projected ServiceAccount tokens.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubeforge.api import FineTuneJobSpec, InferenceServiceSpec, QuantizeJobSpec
from kubeforge.api.crd import all_crds
from kubeforge_runtime import contract

FTJ = {"model": {"uri": "hf://a/b"}, "dataset": {"uri": "pvc://d/t.jsonl"}, "output": {"uri": "pvc://m/o"}}
SPECS = [(FineTuneJobSpec, FTJ), (QuantizeJobSpec, {"model": {"uri": "s3://b/base"}, "output": {"uri": "s3://b/q"}}),
         (InferenceServiceSpec, {"model": {"uri": "pvc://m/base"}})]


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
