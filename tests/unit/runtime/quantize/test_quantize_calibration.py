"""AWQ (``int4-weight-only-awq``): the calibration data is read and changes the int4 weights.

Real torchao calls on the tiny random-weight model (``conftest.py``): AWQ's prepare step wraps
the linear layers in observers, the calibration windows run through the model, the convert
step picks per-channel scales from what was observed. Nothing here is mocked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from kubeforge_runtime import contract, models
from kubeforge_runtime.quantize import ConfigError, data, parse_config, runner
from kubeforge_runtime.quantize.methods import get_method

GROUP_SIZE = 64  # as in conftest.py

TEXTS_A = [
    "The quick brown fox jumps over the lazy dog while the scheduler places pods onto nodes.",
    "Quantization stores weights in fewer bits so that the model is smaller and often faster.",
] * 2
TEXTS_B = [
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n",
    "SELECT name, count(*) FROM users GROUP BY name HAVING count(*) > 3 ORDER BY 2 DESC;",
] * 2


def _windows(tiny_model: Path, texts: list[str]) -> list[Any]:
    return data.make_windows(models.load_tokenizer(str(tiny_model)), texts, 32)


def _awq(tiny_model: Path, texts: list[str]) -> Any:
    return get_method("int4-weight-only-awq").load_quantized(
        tiny_model, "cpu", GROUP_SIZE, embeddings=False, calibration=_windows(tiny_model, texts))


def _int4_weights(model: Any) -> dict[str, Any]:
    head = model.get_output_embeddings()
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head}


def test_changing_the_calibration_data_changes_the_quantized_weights(tiny_model: Path) -> None:
    # Two AWQ runs only (each ~1-2 minutes on the loaded 2-core machine); AWQ itself is
    # deterministic (no sampling: a mean over the observed inputs and a grid search).
    a, b = _awq(tiny_model, TEXTS_A), _awq(tiny_model, TEXTS_B)
    wa, wb = _int4_weights(a), _int4_weights(b)
    assert wa and all(type(w).__name__ == "Int4OpaqueTensor" for w in wa.values())
    assert all(w.act_pre_scale is not None for w in wa.values()), "every layer carries its AWQ scales"
    scales_differ = [n for n in wa if not torch.equal(wa[n].act_pre_scale, wb[n].act_pre_scale)]
    packed_differ = [n for n in wa if not torch.equal(wa[n].qdata, wb[n].qdata)]
    assert len(scales_differ) > len(wa) // 2, scales_differ
    assert len(packed_differ) > len(wa) // 2, packed_differ


def test_awq_logits_stay_near_fp32_and_reload_equal(tiny_model: Path, tmp_path: Path) -> None:
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = models.load_causal_lm(str(tiny_model)).eval()(ids).logits
        method = get_method("int4-weight-only-awq")
        model = method.load_quantized(tiny_model, "cpu", GROUP_SIZE, calibration=_windows(tiny_model, TEXTS_A))
        logits = model(ids).logits
        rel = float((logits.float() - reference).norm() / reference.norm())
        assert rel < 0.25, f"relative logits error {rel:.4f}"  # as int4-weight-only in test_quantize_methods
        facts = method.save(model, tmp_path / "out")
        assert facts["loadRequires"] and "int8" in facts["embeddings"]
        models.load_requirements(str(tmp_path / "out"))
        loaded = models.load_causal_lm(str(tmp_path / "out")).eval()
        weight = loaded.model.layers[0].mlp.up_proj.weight
        assert weight.act_pre_scale is not None, "the AWQ scales must survive saving and loading"
        assert torch.equal(loaded(ids).logits, logits)


def test_a_calibrating_method_without_calibration_data_is_a_config_error() -> None:
    cfg = {"model": {"uri": "file:///m"}, "method": "int4-weight-only-awq", "output": {"uri": "file:///o"}}
    with pytest.raises(ConfigError, match="calibration.uri"):
        parse_config(cfg)
    assert parse_config({**cfg, "calibration": {"uri": "file:///c.jsonl"}}).calibration.samples == 128


def test_the_report_shows_the_uncalibrated_method_on_the_same_data(
    write_config: Callable[..., Path], report_file: Path, eval_jsonl: Path, tmp_path: Path
) -> None:
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS_B))
    config = write_config("int4-weight-only-awq", calibration={"uri": f"file://{calibration}", "samples": 3},
                          evaluation={"uri": f"file://{eval_jsonl}", "maxPerplexityIncreasePercent": 100.0,
                                      "maxSamples": 64, "sequenceLength": 64})
    assert runner.main(["--config", str(config)]) == contract.EXIT_OK
    report = json.loads(report_file.read_text())
    other = report["uncalibrated"]
    assert other["method"] == "int4-weight-only" and other["perplexity"] > 0
    assert other["perplexity"] != report["perplexity"]["after"], "the calibrated model is another model"
    assert "int4-weight-only without calibration, same data: perplexity" in report["message"]
    assert "does not calibrate" not in report["message"]
    out = Path(report["outputUri"].removeprefix("file://"))
    lineage = json.loads((out / models.LINEAGE_FILE).read_text())
    assert lineage["calibrationData"]["uri"] == f"file://{calibration}"
    assert lineage["calibrationData"]["texts"] == 3 and lineage["calibrationData"]["tokens"] > 0
    assert lineage["quantization"]["groupSize"] == GROUP_SIZE
