"""Config parsing, presets, ParallelDims validation and the LR schedule (no processes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubeforge_runtime.train.config import PRESETS, ConfigError, load_config, parse_config, preset
from kubeforge_runtime.train.parallel_dims import ModelShape, ParallelDims

MINIMAL: dict[str, Any] = {
    "kind": "FineTuneJob", "name": "demo", "namespace": "default",
    "model": {"uri": "file:///models/base"},
    "dataset": {"uri": "file:///data/train.jsonl"},
    "output": {"uri": "file:///out/model"},
}

# The example from the FineTuneJob contract, every key spelled out.
FULL: dict[str, Any] = {
    "kind": "FineTuneJob", "name": "demo", "namespace": "default",
    "model": {"uri": "file:///models/base"},
    "dataset": {"uri": "file:///data/train.jsonl", "format": "chat", "validationUri": None, "validationSplit": 0.1,
                "sequenceLength": 512, "packing": True,
                "redact": [], "checks": {"maxUnparseableShare": 0.01, "maxDuplicateShare": 0.05, "maxLabelImbalance": 4.0,
                           "minRecords": 10, "maxOverlongShare": 0.1, "maxPiiShare": 0.02}},
    "method": "lora",
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "parallelism": {"tensor": 1, "pipeline": 1, "strategy": "fsdp", "pipelineSchedule": "1F1B"},
    "training": {"epochs": 1, "maxSteps": None, "globalBatchSize": 8, "microBatchSize": 1, "learningRate": 0.0001,
                 "warmupSteps": 0, "weightDecay": 0.0, "maxGradNorm": 1.0, "seed": 42, "precision": "fp32",
                 "gradientCheckpointing": False, "evalIntervalSteps": 0, "attention": "sdpa", "compile": "off",
                 "fused": "on", "mergedProjections": "off"},
    "checkpoint": {"intervalSteps": 100, "keepLast": 2, "uri": None},
    "output": {"uri": "file:///out/model", "format": "adapter"},
    "evaluation": {"uri": "file:///data/test.jsonl", "metric": "exactMatch", "maxSamples": 200},
    "distillation": None,
}


def with_(base: dict[str, Any], section: str, **values: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    out.setdefault(section, {}).update(values)
    return out


def test_minimal_config_takes_documented_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.method == "full" and cfg.dataset.format == "text" and cfg.dataset.sequenceLength == 512
    assert cfg.dataset.packing is True and cfg.dataset.validationSplit == 0.1 and cfg.dataset.validationUri is None
    assert cfg.parallelism.strategy == "fsdp" and cfg.parallelism.pipelineSchedule == "1F1B"
    assert cfg.training.globalBatchSize == 8 and cfg.training.microBatchSize == 1 and cfg.training.maxSteps is None
    assert cfg.training.learningRate == 1e-4 and cfg.training.seed == 42 and cfg.training.precision == "fp32"
    assert cfg.checkpoint.intervalSteps == 100 and cfg.checkpoint.keepLast == 2 and cfg.checkpoint.uri is None
    assert cfg.lora.targetModules == ["q_proj", "k_proj", "v_proj", "o_proj"] and cfg.output.format == "merged"


def test_full_config_round_trips() -> None:
    cfg = parse_config(FULL)
    assert cfg.to_dict() == FULL


@pytest.mark.parametrize("data, words", [
    ({**MINIMAL, "epochz": 1}, ["unknown key", "epochz"]),
    (with_(MINIMAL, "training", learningrate=1), ["unknown key training.learningrate", "learningRate"]),
    (with_(MINIMAL, "dataset", format="csv"), ["dataset.format", "csv"]),
    (with_(MINIMAL, "training", globalBatchSize="8"), ["training.globalBatchSize", "integer"]),
    (with_(MINIMAL, "dataset", packing="yes"), ["dataset.packing", "true or false"]),
    (with_(MINIMAL, "training", globalBatchSize=10, microBatchSize=4), ["multiple of", "microBatchSize"]),
    (with_(MINIMAL, "dataset", validationSplit=1.5), ["validationSplit"]),
    ({**MINIMAL, "model": {}}, ["model.uri", "required"]),
    ({**MINIMAL, "method": "full", "output": {"uri": "file:///o", "format": "adapter"}}, ["adapter", "lora"]),
    ({**MINIMAL, "kind": "QuantizeJob"}, ["kind"]),
    (with_(MINIMAL, "dataset", checks={"maxLabelImbalance": 2}), ["maxLabelImbalance needs labels", "chat"]),
    (with_(MINIMAL, "dataset", checks={"maxDuplicateShare": 1.5}), ["dataset.checks.maxDuplicateShare", "<= 1"]),
    (with_(MINIMAL, "dataset", checks={"minRecords": 0.5}), ["dataset.checks.minRecords", "integer"]),
    (with_(MINIMAL, "dataset", checks={"maxDupes": 0.1}), ["unknown key dataset.checks.maxDupes", "maxDuplicateShare"]),
])
def test_errors_name_the_field(data: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("strategy", ["deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3"])
def test_deepspeed_strategies_parse_and_refuse_what_zero_does_not_do(strategy: str) -> None:
    assert parse_config(with_(MINIMAL, "parallelism", strategy=strategy)).parallelism.strategy == strategy
    with pytest.raises(ConfigError, match="data parallel only.*tensor and pipeline to 1"):
        parse_config(with_(MINIMAL, "parallelism", strategy=strategy, tensor=2))
    with pytest.raises(ConfigError, match="fp16 is not supported.*bf16"):
        parse_config(with_(with_(MINIMAL, "parallelism", strategy=strategy), "training", precision="fp16"))


def test_ddp_refuses_tensor_parallelism_and_takes_pipeline_parallelism() -> None:
    with pytest.raises(ConfigError, match="strategy ddp cannot be combined with parallelism.tensor 2.*use strategy fsdp"):
        parse_config(with_(MINIMAL, "parallelism", strategy="ddp", tensor=2))
    assert parse_config(with_(MINIMAL, "parallelism", strategy="ddp", pipeline=2)).parallelism.pipeline == 2


@pytest.mark.parametrize("value, words", [
    (True, ["training.epochs", "expected an integer, got True"]),
    (1.5, ["training.epochs", "expected an integer"]),
    (0, ["training.epochs", "must be >= 1"]),
    (1001, ["training.epochs", "must be <= 1000"]),
])
def test_no_coercion_and_bounds_name_the_field(value: Any, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(with_(MINIMAL, "training", epochs=value))
    for w in words:
        assert w in str(err.value)


def test_load_config_reports_bad_json_with_position(tmp_path: Path) -> None:
    p = tmp_path / "c.json"
    p.write_text('{"kind": "FineTuneJob",\n "model": }')
    with pytest.raises(ConfigError, match="line 2"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")


def test_presets_parse() -> None:
    for name in PRESETS:
        cfg = preset(name, {"model": {"uri": "file:///m"}, "dataset": {"uri": "file:///d"}, "output": {"uri": "file:///o"}})
        assert cfg.training.globalBatchSize % cfg.training.microBatchSize == 0
    assert preset("tiny-cpu", MINIMAL).training.precision == "fp32"
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")


# --- ParallelDims -------------------------------------------------------------------------------

TINY = ModelShape(num_layers=4, num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=128, vocab_size=512)


def test_degrees_and_accumulation() -> None:
    d = ParallelDims(world_size=8, tp=2, pp=2, global_batch_size=16, micro_batch_size=2, model=TINY)
    assert (d.pp, d.dp, d.tp, d.grad_accum, d.local_batch_size) == (2, 2, 2, 4, 8)
    assert [list(d.stage_layers(s)) for s in range(2)] == [[0, 1], [2, 3]]
    d3 = ParallelDims(world_size=3, pp=3, global_batch_size=3, micro_batch_size=1, model=TINY)
    assert [list(d3.stage_layers(s)) for s in range(3)] == [[0, 1], [2], [3]]


@pytest.mark.parametrize("kwargs, words", [
    (dict(world_size=6, tp=4), ["does not divide the world size 6", "choose degrees"]),
    (dict(world_size=3, tp=3, model=TINY), ["num_attention_heads (4)", "num_key_value_heads (2)", "e.g. 2"]),
    (dict(world_size=8, pp=8, model=TINY), ["exceeds the model's 4 decoder layers"]),
    (dict(world_size=4, global_batch_size=6), ["multiple of", "x data-parallel degree (4)"]),
    (dict(world_size=2, pp=2, global_batch_size=2, micro_batch_size=2), ["1F1B", "or use GPipe"]),
])
def test_invalid_layouts_say_what_to_change(kwargs: dict[str, Any], words: list[str]) -> None:
    kwargs.setdefault("global_batch_size", 8)
    with pytest.raises(ConfigError) as err:
        ParallelDims(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_gpipe_accepts_fewer_micro_batches_than_stages() -> None:
    ParallelDims(world_size=2, pp=2, global_batch_size=2, micro_batch_size=2, pipeline_schedule="GPipe")


def test_lr_schedule_warmup_then_cosine_to_ten_percent() -> None:
    from kubeforge_runtime.train.trainer import lr_at

    lrs = [lr_at(s, 10, 1.0, 2) for s in range(11)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[10] == pytest.approx(0.1)


def test_distillation_goes_with_method_distill_only() -> None:
    teacher = {"teacher": {"uri": "file:///models/teacher"}, "temperature": 2.0, "alpha": 0.5}
    cfg = parse_config({**MINIMAL, "method": "distill", "distillation": teacher})
    assert cfg.distillation.teacher.uri == "file:///models/teacher" and cfg.distillation.alpha == 0.5
    for bad in ({**MINIMAL, "method": "distill"}, {**MINIMAL, "distillation": teacher}):
        with pytest.raises(ConfigError, match="distillation: set it together with method 'distill'"):
            parse_config(bad)
    with pytest.raises(ConfigError, match="distillation.alpha"):
        parse_config({**MINIMAL, "method": "distill", "distillation": {**teacher, "alpha": 2}})
