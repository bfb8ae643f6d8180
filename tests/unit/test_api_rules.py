"""Rules that live in the API models, checked at every layer that enforces them offline.

Each rule is a pydantic rule of the API model and a CEL rule in the generated CRD (the API
server's side is tests/cluster/test_api_server.py), so ``kubeforge validate``, the SDK and the
operator refuse what the API server refuses:

* ``parallelism.strategy: ddp`` with ``parallelism.tensor > 1`` (also refused by the trainer's
  own config, so the preflight exits 78: tests/unit/runtime/train/test_train_launch.py);
* ``training.precision: fp16`` with ``parallelism.pipeline > 1``;
* ``training.attention: flex_attention | flash_attention_2`` without GPUs;
* ``method: qlora`` with anything but FSDP data parallelism (the trainer's config refuses it
  too); ``output.format: adapter`` with a method other than lora or qlora;
* ``template.env`` setting a variable the operator sets (torchrun's, KUBEFORGE_*);
* ``template.labels`` setting a ``kubeforge.io/`` label (the operator's selectors use them);
* InferenceService adapter names: unique, and none equal to the service's name.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubeforge.api import FineTuneJobSpec, InferenceServiceSpec, QuantizeJobSpec
from support.crds import cel_rules
from kubeforge.api.inference import InferenceService
from kubeforge.controllers import inference_status as ic
from kubeforge.manifests import ManifestError, parse_resource
from kubeforge.sdk import FineTuner, InferenceServer
from kubeforge_runtime import contract

REPO = Path(__file__).resolve().parents[2]
FTJ = {"model": {"uri": "hf://a/b"}, "dataset": {"uri": "pvc://d/t.jsonl"}, "output": {"uri": "pvc://m/o"},
       "procsPerNode": 2}
DDP_TP = {**FTJ, "parallelism": {"strategy": "ddp", "tensor": 2}}
QLORA_TP = {**FTJ, "method": "qlora", "parallelism": {"tensor": 2}}
FP16_PP = {**FTJ, "parallelism": {"pipeline": 2}, "training": {"precision": "fp16", "globalBatchSize": 8}}
FLEX_CPU = {**FTJ, "training": {"attention": "flex_attention"}}
DUP_ADAPTERS = {"model": {"uri": "pvc://m/base"},
                "adapters": [{"name": "sql", "uri": "pvc://m/a1"}, {"name": "sql", "uri": "pvc://m/a2"}]}
CLASH = {"model": {"uri": "pvc://m/base"}, "adapters": [{"name": "chat", "uri": "pvc://m/a1"}]}


def doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


# --- ddp with tensor parallelism, fp16 with pipeline parallelism -------------------------------

def test_ddp_with_tensor_parallelism_is_refused_by_the_model_and_cel():
    with pytest.raises(ValidationError, match="strategy ddp cannot be combined with parallelism.tensor > 1.*use strategy fsdp"):
        FineTuneJobSpec.model_validate(DDP_TP)
    FineTuneJobSpec.model_validate({**FTJ, "parallelism": {"strategy": "ddp", "pipeline": 2}})
    FineTuneJobSpec.model_validate({**FTJ, "parallelism": {"strategy": "fsdp", "tensor": 2}})
    assert "self.strategy != 'ddp' || self.tensor == 1" in cel_rules("FineTuneJob")


def test_fp16_with_pipeline_parallelism_is_refused_by_the_model_and_cel():
    with pytest.raises(ValidationError, match="fp16 is not supported with pipeline parallelism"):
        FineTuneJobSpec.model_validate(FP16_PP)
    FineTuneJobSpec.model_validate({**FP16_PP, "parallelism": {"pipeline": 1}})
    assert "self.training.precision != 'fp16' || self.parallelism.pipeline == 1" in cel_rules("FineTuneJob")


def test_gpu_only_attention_kernels_without_gpus_are_refused_by_the_model_and_cel():
    with pytest.raises(ValidationError, match="training.attention flex_attention and flash_attention_2 train on CUDA"):
        FineTuneJobSpec.model_validate(FLEX_CPU)
    FineTuneJobSpec.model_validate({**FLEX_CPU, "resources": {"gpus": 2}})
    FineTuneJobSpec.model_validate({**FTJ, "training": {"attention": "sdpa", "compile": "on"}})
    assert ("!(self.training.attention in ['flex_attention', 'flash_attention_2']) || self.resources.gpus > 0"
            in cel_rules("FineTuneJob"))


@pytest.mark.parametrize("parallelism", [{"tensor": 2}, {"pipeline": 2}, {"strategy": "ddp"},
                                         {"strategy": "deepspeed-zero3"}])
def test_qlora_outside_fsdp_data_parallelism_is_refused_by_the_model_cel_and_trainer(parallelism):
    from kubeforge_runtime.train.config import ConfigError, parse_config

    with pytest.raises(ValidationError, match="method qlora runs data parallel with FSDP2 only"):
        FineTuneJobSpec.model_validate({**FTJ, "method": "qlora", "parallelism": parallelism})
    spec = FineTuneJobSpec.model_validate({**FTJ, "method": "qlora", "output": {"uri": "pvc://m/o", "format": "adapter"}})
    assert spec.method == "qlora" and spec.output.format == "adapter"
    assert ("self.method != 'qlora' || (self.parallelism.strategy == 'fsdp' && self.parallelism.tensor == 1 && "
            "self.parallelism.pipeline == 1)") in cel_rules("FineTuneJob")
    assert "self.output.format != 'adapter' || self.method == 'lora' || self.method == 'qlora'" in cel_rules("FineTuneJob")
    with pytest.raises(ConfigError, match="method qlora runs data parallel with FSDP2 only"):
        parse_config({"model": {"uri": "file:///m"}, "dataset": {"uri": "file:///d.jsonl"}, "output": {"uri": "file:///o"},
                      "method": "qlora", "parallelism": parallelism})


def test_the_sdk_offers_qlora():
    ft = FineTuner(training_data="pvc://d/t.jsonl", base_model="hf://a/b", adapter_type="qlora")
    assert ft.manifest()["spec"]["method"] == "qlora"


def test_the_sdk_defaults_to_fsdp_and_refuses_ddp_with_tensor_parallelism():
    ft = FineTuner(training_data="pvc://d/t.jsonl", base_model="hf://a/b", procs_per_node=2, tensor_parallel=2)
    assert ft.strategy == "fsdp"
    assert ft.manifest()["spec"]["parallelism"]["strategy"] == "fsdp"
    with pytest.raises(ManifestError, match="use strategy fsdp"):
        FineTuner(training_data="pvc://d/t.jsonl", base_model="hf://a/b", procs_per_node=2, tensor_parallel=2,
                  strategy="ddp").manifest()


# --- reserved environment variables --------------------------------------------------------------

@pytest.mark.parametrize("name", [*contract.TORCHRUN_ENV, *contract.OPERATOR_ENV])
def test_template_env_may_not_set_what_the_operator_sets(name: str):
    env = {"template": {"env": [{"name": "FINE", "value": "1"}, {"name": name, "value": "x"}]}}
    for model, spec in ((FineTuneJobSpec, {**FTJ, **env}),
                        (QuantizeJobSpec, {"model": {"uri": "pvc://m/a"}, "output": {"uri": "pvc://m/q"}, **env}),
                        (InferenceServiceSpec, {"model": {"uri": "pvc://m/a"}, **env})):
        with pytest.raises(ValidationError, match=f"template.env: {name} is set by the operator"):
            model.model_validate(spec)


def test_reserved_env_cel_lists_the_names_and_other_names_pass():
    text = cel_rules("FineTuneJob")
    assert "is set by the operator and cannot be overridden" in text
    for name in contract.RESERVED_ENV:
        assert f"'{name}'" in text, name
    spec = FineTuneJobSpec.model_validate({**FTJ, "template": {"env": [
        {"name": "PET_LOG_DIR", "value": "/workspace/logs"}, {"name": "KUBEFORGE_PEAK_FLOPS", "value": "1e15"},
        {"name": "NCCL_DEBUG", "value": "INFO"}]}})
    assert [e.name for e in spec.template.env] == ["PET_LOG_DIR", "KUBEFORGE_PEAK_FLOPS", "NCCL_DEBUG"]


# --- reserved labels ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["kubeforge.io/inferenceservice", "kubeforge.io/finetunejob", "serving.kubeforge.io/x"])
def test_template_labels_may_not_use_the_operators_domain(key: str):
    labels = {"template": {"labels": {"team": "a", key: "chat"}}}
    for model, spec in ((FineTuneJobSpec, {**FTJ, **labels}),
                        (QuantizeJobSpec, {"model": {"uri": "pvc://m/a"}, "output": {"uri": "pvc://m/q"}, **labels}),
                        (InferenceServiceSpec, {"model": {"uri": "pvc://m/a"}, **labels})):
        with pytest.raises(ValidationError, match=f"template.labels: {key} is reserved for the operator") as err:
            model.model_validate(spec)
        assert err.value.errors()[0]["loc"] == ("template", "labels")


def test_other_labels_pass_and_the_cel_rule_is_in_every_crd():
    spec = FineTuneJobSpec.model_validate({**FTJ, "template": {"labels": {
        "kueue.x-k8s.io/queue-name": "q", "kubeforge.io.example.com/x": "1", "notkubeforge.io/y": "2", "kubeforge": "3"}}})
    assert len(spec.template.labels) == 4
    for kind in ("FineTuneJob", "QuantizeJob", "InferenceService"):
        assert "self.labels.all(k, !(k.startsWith('kubeforge.io/')" in cel_rules(kind), kind


# --- adapter names -----------------------------------------------------------------------------------

def test_adapter_names_rule_lives_in_the_api_model():
    with pytest.raises(ValueError, match="names must be unique; repeated: sql"):
        InferenceService.validate_object("svc", InferenceServiceSpec.model_validate(DUP_ADAPTERS))
    with pytest.raises(ValueError, match='adapter name "chat" clashes with the base model'):
        InferenceService.validate_object("chat", InferenceServiceSpec.model_validate(CLASH))
    InferenceService.validate_object("svc", InferenceServiceSpec.model_validate(CLASH))
    text = cel_rules("InferenceService")
    assert "self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))" in text
    assert "self.spec.adapters.all(a, a.name != self.metadata.name)" in text


def test_adapter_names_are_refused_by_validate_the_sdk_and_the_operator():
    with pytest.raises(ManifestError, match="InferenceService/svc: spec.adapters: names must be unique; repeated: sql"):
        parse_resource(doc("InferenceService", "svc", DUP_ADAPTERS))
    with pytest.raises(ManifestError, match="clashes with the base model"):
        InferenceServer(model_path="pvc://m/base", name="chat", adapters={"chat": "pvc://m/a1"}).manifest()
    with pytest.raises(ic.InvalidSpec, match="clashes with the base model"):
        ic.validate(doc("InferenceService", "chat", CLASH))


# --- kubeforge validate, as a user runs it ---------------------------------------------------------

@pytest.mark.parametrize("resource, message", [
    (doc("FineTuneJob", "ddp", DDP_TP), "use strategy fsdp"),
    (doc("FineTuneJob", "fp16", FP16_PP), "fp16 is not supported with pipeline parallelism"),
    (doc("FineTuneJob", "flex", FLEX_CPU), "training.attention flex_attention and flash_attention_2 train on CUDA"),
    (doc("FineTuneJob", "qlora", QLORA_TP), "method qlora runs data parallel with FSDP2 only"),
    (doc("InferenceService", "env", {"model": {"uri": "pvc://m/a"},
                                     "template": {"env": [{"name": "MASTER_ADDR", "value": "x"}]}}),
     "template.env: MASTER_ADDR is set by the operator"),
    (doc("InferenceService", "chat", CLASH), 'adapter name "chat" clashes'),
    (doc("InferenceService", "labels", {"model": {"uri": "pvc://m/a"},
                                        "template": {"labels": {"kubeforge.io/inferenceservice": "other"}}}),
     "spec.template.labels: Value error, template.labels: kubeforge.io/inferenceservice is reserved for the operator"),
    (doc("InferenceService", "svc", DUP_ADAPTERS), "repeated: sql"),
])
def test_kubeforge_validate_refuses_what_the_api_server_refuses(tmp_path: Path, resource: dict, message: str):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(resource))
    out = subprocess.run([sys.executable, "-m", "kubeforge", "validate", "-f", str(path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and message in out.stderr, out.stderr


@pytest.mark.parametrize("output", ["pvc://m/base", "pvc://m/base/", "pvc://m/x/../base/int8", "pvc://m"])
def test_a_quantize_job_may_not_write_into_its_own_model(output: str):
    # The quantizer replaces weight files in its output; compared after normalisation.
    with pytest.raises(ValidationError, match="would delete its own input"):
        QuantizeJobSpec.model_validate({"model": {"uri": "pvc://m/base"}, "output": {"uri": output}})
    QuantizeJobSpec.model_validate({"model": {"uri": "pvc://m/base"}, "output": {"uri": "pvc://m/base-int8"}})


@pytest.mark.parametrize("uri", ["pvc://models/x\x00", "pvc://models/a\nb", "hf://acme\x01/tiny", "s3://b/k\x7f",
                                 "pvc://models/" + "a" * 2048])
def test_uris_with_control_characters_or_past_the_length_bound_are_refused(uri):
    """Found by tests/cluster/test_hostile_inputs.py: a NUL passed the CRD's pattern and the model's,
    and a 300 KB URI was admitted, then broke every apply of the children (annotation budget)."""
    from pydantic import ValidationError

    from kubeforge.api import InferenceServiceSpec, QuantizeJobSpec

    with pytest.raises(ValidationError):
        InferenceServiceSpec.model_validate({"model": {"uri": uri}})
    with pytest.raises(ValidationError):
        QuantizeJobSpec.model_validate({"model": {"uri": "pvc://models/base"}, "output": {"uri": uri}})
    InferenceServiceSpec.model_validate({"model": {"uri": "pvc://models/" + "a" * 2000}})  # long but bounded


def test_template_sizes_are_bounded_in_the_model():
    """kopf copies the spec into a 256 KiB annotation: the fields that can grow alone are capped."""
    from kubeforge.api.base import PodTemplateOverride

    with pytest.raises(ValidationError, match="env.0.value"):
        PodTemplateOverride.model_validate({"env": [{"name": "BLOB", "value": "x" * 300_000}]})
    with pytest.raises(ValidationError, match="annotations.`example.com/blob`"):
        PodTemplateOverride.model_validate({"annotations": {"example.com/blob": "x" * 300_000}})
    with pytest.raises(ValidationError, match="annotations"):
        PodTemplateOverride.model_validate({"annotations": {f"k{i}": "v" for i in range(65)}})
    PodTemplateOverride.model_validate({"env": [{"name": "OK", "value": "x" * 32 * 1024}],
                                        "annotations": {f"k{i}": "v" for i in range(64)}})


def test_a_calibrating_quantize_method_needs_calibration_data():
    spec = {"model": {"uri": "pvc://m/base"}, "output": {"uri": "pvc://m/q"}, "method": "int4-weight-only-awq"}
    with pytest.raises(ValidationError, match="int4-weight-only-awq calibrates on your data: set calibration.uri"):
        QuantizeJobSpec.model_validate(spec)
    ok = QuantizeJobSpec.model_validate({**spec, "calibration": {"uri": "pvc://data/cal.jsonl"}})
    assert ok.calibration.samples == 128
    # The same rule in the CRD, so the API server refuses it first (tests/cluster/test_api_server.py).
    assert "int4-weight-only-awq calibrates on your data: set calibration.uri" in cel_rules("QuantizeJob")
