"""The rendered config: exactly the operator's shape parses; anything else names its problem."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from kubeforge_runtime.quantize.config import METHODS, ConfigError, load_config, parse_config
from kubeforge_runtime.quantize.methods import REGISTRY

EXAMPLE: dict[str, Any] = {
    "kind": "QuantizeJob",
    "name": "demo",
    "namespace": "default",
    "model": {"uri": "file:///models/m"},
    "method": "int4-weight-only",
    "groupSize": 128,
    "calibration": {"uri": None, "samples": 128},
    "evaluation": {
        "uri": "file:///data/eval.jsonl",
        "maxPerplexityIncreasePercent": 1.0,
        "maxSamples": 64,
        "sequenceLength": 256,
    },
    "output": {"uri": "file:///out/q"},
}


def test_the_documented_example_parses() -> None:
    cfg = parse_config(EXAMPLE)
    assert cfg.method == "int4-weight-only" and cfg.group_size == 128
    assert cfg.model.uri == "file:///models/m" and cfg.output.uri == "file:///out/q"
    assert cfg.evaluation.max_perplexity_increase_percent == 1.0
    assert cfg.evaluation.sequence_length == 256 and cfg.evaluation.max_samples == 64
    assert cfg.calibration.uri is None and cfg.calibration.samples == 128


def test_defaults_when_optional_sections_are_absent() -> None:
    cfg = parse_config({"model": {"uri": "/m"}, "method": "bf16", "output": {"uri": "/o"}})
    assert cfg.evaluation.uri is None and cfg.evaluation.max_perplexity_increase_percent == 1.0
    assert cfg.group_size == 128


@pytest.mark.parametrize(
    ("path", "key"),
    [((), "resources"), (("evaluation",), "maxPerplexity"), (("model",), "fineTuneJobRef"), (("calibration",), "dataset")],
)
def test_unknown_keys_are_errors_naming_the_key(path: tuple[str, ...], key: str) -> None:
    data = copy.deepcopy(EXAMPLE)
    target = data
    for part in path:
        target = target[part]
    target[key] = 1
    with pytest.raises(ConfigError, match=".".join((*path, key))):
        parse_config(data)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"method": "int3"}, "method"),
        ({"groupSize": 100}, "groupSize"),
        ({"groupSize": 256}, "groupSize"),
        ({"kind": "FineTuneJob"}, "kind"),
        ({"evaluation": {"maxPerplexityIncreasePercent": -1}}, "maxPerplexityIncreasePercent"),
        ({"evaluation": {"sequenceLength": 1}}, "sequenceLength"),
        ({"model": {}}, "model.uri"),
    ],
)
def test_invalid_values_say_what_to_change(change: dict[str, Any], match: str) -> None:
    data = {**copy.deepcopy(EXAMPLE), **change}
    with pytest.raises(ConfigError, match=match):
        parse_config(data)


def test_every_method_has_an_implementation() -> None:
    assert set(METHODS) == set(REGISTRY)


def test_load_config_reports_bad_json(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)
    good = tmp_path / "g.json"
    good.write_text(json.dumps(EXAMPLE))
    assert load_config(good).method == "int4-weight-only"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"groupSize": "128"}, ["groupSize"]),
        ({"calibration": {"samples": True}}, ["calibration.samples", "expected an integer"]),
        ({"evaluation": {"maxSamples": 1.0}}, ["evaluation.maxSamples", "expected an integer"]),
        ({"evaluation": {"task": {"uri": "file:///t.jsonl", "metric": "bleu"}}}, ["evaluation.task.metric", "bleu"]),
        ({"evaluation": {"maxAccuracyDropPoints": 1.0}}, ["maxAccuracyDropPoints", "evaluation.task"]),
    ],
)
def test_no_coercion_and_cross_field_rules_name_the_field(change: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**copy.deepcopy(EXAMPLE), **change})
    for w in words:
        assert w in str(err.value)
