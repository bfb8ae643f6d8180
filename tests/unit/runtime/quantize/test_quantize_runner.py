"""The entry point end to end on the tiny model: report, round trip, quality gate, exit codes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from kubeforge_runtime import contract, models
from kubeforge_runtime.quantize import data, runner
from kubeforge_runtime.quantize.methods import get_method
from kubeforge_runtime.serve.config import EngineConfig
from kubeforge_runtime.serve.decode import decode_plan

GROUP_SIZE = 64  # as in conftest.py
COMPACT_KEYS = {
    "originalBytes",
    "quantizedBytes",
    "compressionRatio",
    "latencyMsPerToken",
    "perplexity",
    "perplexityIncreasePercent",
    "maxPerplexityIncreasePercent",
    "gatePassed",
    "method",
    "reason",
    "message",
    "outputUri",
}
REPO = Path(__file__).resolve().parents[4]


def _independent_perplexity(model: Any, tokenizer: Any, texts: list[str], length: int) -> float:
    """Perplexity from the model's own loss over EOS-joined, length-cut windows."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream), length):
            window = torch.tensor(stream[start : start + length])[None]
            if window.shape[1] < 2:
                continue
            nll += float(model(input_ids=window, labels=window).loss) * (window.shape[1] - 1)
            count += window.shape[1] - 1
    return math.exp(nll / count)


def test_int8_dynamic_reports_saves_and_round_trips(
    write_config: Callable[..., Path], report_file: Path, tiny_model: Path, eval_jsonl: Path
) -> None:
    config = write_config("int8-dynamic")
    assert runner.main(["--config", str(config)]) == contract.EXIT_OK

    raw = report_file.read_bytes()
    assert len(raw) < 4096, "the termination message is cut at 4096 bytes"
    report = json.loads(raw)
    assert COMPACT_KEYS <= set(report)
    assert report["gatePassed"] is True and report["reason"] == "Succeeded"
    assert report["compressionRatio"] == pytest.approx(report["originalBytes"] / report["quantizedBytes"], rel=1e-4)
    assert report["quantizedBytes"] < report["originalBytes"]
    assert report["latencyMsPerToken"]["before"] > 0 and report["latencyMsPerToken"]["after"] > 0

    # Perplexity before/after against an independent computation on the same texts.
    tokenizer = models.load_tokenizer(tiny_model)
    records = [json.loads(line) for line in eval_jsonl.read_text().splitlines()]
    texts = [r["text"] if "text" in r else r["prompt"] + r["completion"] for r in records]
    expected_before = _independent_perplexity(models.load_causal_lm(tiny_model).eval(), tokenizer, texts, 64)
    quantized = get_method("int8-dynamic").load_quantized(tiny_model, "cpu", GROUP_SIZE)
    expected_after = _independent_perplexity(quantized, tokenizer, texts, 64)
    assert report["perplexity"]["before"] == pytest.approx(expected_before, rel=1e-5)
    assert report["perplexity"]["after"] == pytest.approx(expected_after, rel=1e-5)
    # Each perplexity agrees to 1e-5 relative, so their difference in percent to about 2e-3.
    assert report["perplexityIncreasePercent"] == pytest.approx(
        (expected_after - expected_before) / expected_before * 100, rel=1e-3, abs=2e-3
    )

    out = Path(report["outputUri"].removeprefix("file://"))
    full = json.loads((out / "quantization-report.json").read_text())
    assert full["before"]["linearWeightBytes"] > full["after"]["linearWeightBytes"]
    assert full["latency"]["repeats"] == runner.LATENCY_REPEATS
    # The latency path is the server's: the engine and engine.compile plan a default
    # InferenceService would run on this device (same function, same default setting).
    served_plan = decode_plan(EngineConfig().compile, "cpu")
    assert report["latencyPath"] == f"continuous engine, {served_plan.describe()}, batch 1"
    assert full["latency"]["path"] == f"continuous engine, {served_plan.describe()}"
    # int8-dynamic eager on CPU cannot be fast: the report and its message say so.
    assert "_int_scaled_matmul_cpu" in report["latencyNote"] and report["latencyNote"] in report["message"]
    # ... and, on a CPU without int8 dot-product instructions (this one's real flags), why.
    from kubeforge_runtime.quantize.speed import host_cpu

    assert ("no int8 dot-product instructions" in report["latencyNote"]) == (not host_cpu().int8_dot)
    assert set(full["latency"]["msPerTokenByBatch"]["after"]) == {str(b) for b in runner.LATENCY_BATCHES} == {"1", "8"}
    lineage = json.loads((out / models.LINEAGE_FILE).read_text())
    assert lineage["baseModel"]["uri"] == f"file://{tiny_model}" and lineage["quantization"]["format"] == "safetensors"
    assert not (out / runner.REJECTED_MARKER).exists()

    # Round trip through the serving runtime's loader: same tensors, same logits.
    loaded = models.load_causal_lm(out).eval()
    assert type(loaded.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, quantized(ids).logits)
    assert models.load_tokenizer(out)("hello")["input_ids"] == tokenizer("hello")["input_ids"]


def test_int4_gate_failure_exits_79_and_keeps_a_rejected_output(
    write_config: Callable[..., Path], report_file: Path, tiny_model: Path, eval_jsonl: Path, tmp_path: Path
) -> None:
    # int4 on random weights raises perplexity by a few hundredths of a percent: a zero
    # limit fails the gate deterministically (fixed seed, deterministic CPU kernels).
    evaluation = {"uri": f"file://{eval_jsonl}", "maxPerplexityIncreasePercent": 0.0, "maxSamples": 64, "sequenceLength": 64}
    config = write_config("int4-weight-only", evaluation=evaluation)
    assert runner.main(["--config", str(config)]) == contract.EXIT_QUALITY_GATE_FAILED

    report = json.loads(report_file.read_text())
    assert report["gatePassed"] is False and report["reason"] == "QualityGateFailed"
    assert report["perplexityIncreasePercent"] > 0
    assert "perplexity" in report["message"] and "rejected" in report["message"]
    out = Path(report["outputUri"].removeprefix("file://"))
    assert json.loads((out / runner.REJECTED_MARKER).read_text())["reason"] == "QualityGateFailed"
    full = json.loads((out / "quantization-report.json").read_text())
    assert full["gatePassed"] is False
    assert json.loads((out / models.LINEAGE_FILE).read_text())["gatePassed"] is False

    # The rejected output is still a loadable model. Load it in a fresh interpreter, as the
    # serving pod would, to prove the lineage's loadRequires is all a loader needs.
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from kubeforge_runtime import models\n"
        "models.load_requirements(sys.argv[1])\n"
        "m = models.load_causal_lm(sys.argv[1]).eval()\n"
        "assert type(m.model.layers[0].mlp.up_proj.weight).__name__ == 'Int4OpaqueTensor'\n"
        "with torch.no_grad():\n"
        "    torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True, text=True, timeout=180, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "trainer_image")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = get_method("int4-weight-only").load_quantized(tiny_model, "cpu", GROUP_SIZE)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), expected(ids).logits)


def test_bf16_output_round_trips_in_bf16(tiny_model: Path, tmp_path: Path) -> None:
    method = get_method("bf16")
    model = method.load_quantized(tiny_model, "cpu", GROUP_SIZE)
    facts = method.save(model, tmp_path)
    assert facts["format"] == "safetensors"
    loaded = models.load_causal_lm(tmp_path).eval()
    assert next(loaded.parameters()).dtype == torch.bfloat16
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_method_the_hardware_cannot_run_fails_at_once_with_78(
    write_config: Callable[..., Path], report_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pod "has" a GPU (the runner picks cuda) but this machine has none: int4's CUDA
    # kernel really fails. The model must never be loaded: the check comes first.
    monkeypatch.setattr(runner, "_device", lambda: "cuda")

    def must_not_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the capability check")

    monkeypatch.setattr(models, "load_causal_lm", must_not_load)
    started = time.monotonic()
    assert runner.main(["--config", str(write_config("int4-weight-only"))]) == contract.EXIT_CONFIG_ERROR
    assert time.monotonic() - started < 30
    report = json.loads(report_file.read_text())
    assert report["reason"] == "UnsupportedMethod" and report["gatePassed"] is False
    assert "int8-weight-only" in report["message"]


def test_cli_rejects_an_unknown_key_with_78(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": {"uri": "/m"}, "method": "fp16", "output": {"uri": "/o"}, "replicas": 2}))
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "kubeforge_runtime.quantize", "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "trainer_image"), contract.ENV_REPORT_PATH: str(report)},
    )
    assert done.returncode == contract.EXIT_CONFIG_ERROR, done.stderr[-2000:]
    body = json.loads(report.read_text())
    assert body["reason"] == "ConfigError" and "replicas" in body["message"]


def test_latency_prompts_are_the_same_before_and_after() -> None:
    windows = [torch.arange(100), torch.arange(100, 200)]
    assert [p.tolist() for p in data.latency_prompts(windows, 4, 32)] == [list(range(32)), list(range(100, 132))]


def test_layers_the_group_size_does_not_divide_are_reported(
    write_config: Callable[..., Path], report_file: Path, eval_jsonl: Path
) -> None:
    # The tiny preset's layers are 64 wide except down_proj (128): groups of 128 fit only
    # the 4 down_proj layers, the other 24 stay in full precision - and the report says so.
    evaluation = {"uri": f"file://{eval_jsonl}", "maxPerplexityIncreasePercent": 100.0, "sequenceLength": 64}
    config = write_config("int4-weight-only", groupSize=128, evaluation=evaluation)
    assert runner.main(["--config", str(config)]) == contract.EXIT_OK
    report = json.loads(report_file.read_text())
    full = json.loads((Path(report["outputUri"].removeprefix("file://")) / "quantization-report.json").read_text())
    assert full["before"]["fullPrecisionLinearLayers"] == 28
    assert full["after"]["fullPrecisionLinearLayers"] == 24


def test_a_lora_adapter_is_merged_into_its_base_before_quantizing(
    write_config: Callable[..., Path], report_file: Path, tiny_model: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    base = models.load_causal_lm(tiny_model)
    torch.manual_seed(0)  # the random LoRA weights: the same update on every run
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    merged = models.load_causal_lm(adapter, merge_adapter=True).eval()

    config = write_config("bf16", model={"uri": f"file://{adapter}"})
    assert runner.main(["--config", str(config)]) == contract.EXIT_OK
    out = Path(json.loads(report_file.read_text())["outputUri"].removeprefix("file://"))
    loaded = models.load_causal_lm(out).eval()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        # The output is the merged model in bf16: close to the merged fp32 model, and not the
        # base. bf16 rounding moves this tiny model's logits by 0.7-2.1 % of their norm
        # depending on the LoRA draw (2.1 % failed a 2 % bound once, unseeded); the LoRA
        # update moves them by 110-140 %.
        got, want = loaded(ids).logits.float(), merged(ids).logits
        plain = models.load_causal_lm(tiny_model).eval()(ids).logits  # get_peft_model changed `base` in place
    assert (got - want).norm() / want.norm() < 3e-2
    assert (got - plain).norm() / want.norm() > 0.5


def test_the_task_metric_is_measured_on_input_and_output_and_gated(
    write_config: Callable[..., Path], report_file: Path, tiny_model: Path, tmp_path: Path
) -> None:
    from kubeforge_runtime import evaluate

    # References are the start of the original model's own answers: F1 is then well above 0.
    model, tokenizer = models.load_causal_lm(tiny_model), models.load_tokenizer(tiny_model)
    prompts = [f"Question: what is {i} plus {i}? Answer:" for i in range(6)]
    answers = evaluate.generate(model, tokenizer, prompts, 4)
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "completion": a}) + "\n" for p, a in zip(prompts, answers)))
    expected_before = evaluate.evaluate(model, tokenizer, task, "prompt-completion", "f1")["value"]
    assert expected_before > 0
    config = write_config("int8-weight-only")
    cfg = json.loads(config.read_text())
    cfg["evaluation"].update(task={"uri": f"file://{task}", "metric": "f1"}, maxAccuracyDropPoints=100)
    config.write_text(json.dumps(cfg))
    assert runner.main(["--config", str(config)]) == contract.EXIT_OK
    report = json.loads(report_file.read_text())
    assert report["task"]["metric"] == "f1" and report["task"]["samples"] == len(prompts)
    assert report["task"]["before"] == pytest.approx(expected_before, abs=1e-6)
    assert report["task"]["beforeSource"] == "measured"  # the tiny model has no lineage record to take it from
    assert report["taskDropPoints"] == pytest.approx((report["task"]["before"] - report["task"]["after"]) * 100)
    assert "f1 " in report["message"] and "limit -100" in report["message"]

    # The same numbers with a limit below the drop fail the gate (when quantization moved the
    # answers at all; a zero drop passes any limit).
    cfg["evaluation"]["maxAccuracyDropPoints"] = 0
    config.write_text(json.dumps(cfg))
    code = runner.main(["--config", str(config)])
    again = json.loads(report_file.read_text())
    assert code == (contract.EXIT_QUALITY_GATE_FAILED if again["taskDropPoints"] > 0 else contract.EXIT_OK)


@pytest.mark.parametrize("spelling", ["same", "same-odd-spelling", "inside", "contains", "symlink"])
def test_an_output_that_overlaps_the_input_is_refused_with_78_and_the_input_kept(
    write_config: Callable[..., Path], report_file: Path, tiny_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, spelling: str,
) -> None:
    # Saving clears model*.safetensors in the output: an output that is (or holds, or lies
    # in) the input would delete the model being quantized. A copy, so a failure here
    # cannot destroy the session's model.
    import shutil

    model = tmp_path / "models" / "base"
    shutil.copytree(tiny_model, model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    (tmp_path / "link").symlink_to(model)
    output = {
        "same": f"file://{model}",
        "same-odd-spelling": f"file://{model.parent}/../models//./base/",
        "inside": f"file://{model}/int8",
        "contains": f"file://{model.parent}",
        "symlink": f"file://{tmp_path / 'link'}",
    }[spelling]

    def must_not_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(models, "load_causal_lm", must_not_load)
    config = write_config("int8-dynamic", model={"uri": f"file://{model}"}, output={"uri": output})
    assert runner.main(["--config", str(config)]) == contract.EXIT_CONFIG_ERROR
    report = json.loads(report_file.read_text())
    assert report["reason"] == "ConfigError", report
    assert "would delete its own input" in report["message"] and "choose an output.uri outside" in report["message"]
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before


def test_an_output_inside_a_lora_adapters_base_is_refused(
    write_config: Callable[..., Path], report_file: Path, tiny_model: Path, tmp_path: Path
) -> None:
    # Quantizing an adapter reads its base model too: writing into the base would clear it.
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    config = write_config("int8-dynamic", model={"uri": f"file://{adapter}"}, output={"uri": f"file://{base}"})
    assert runner.main(["--config", str(config)]) == contract.EXIT_CONFIG_ERROR
    message = json.loads(report_file.read_text())["message"]
    assert f"the model being quantized ({base.resolve()})" in message
    assert (base / "model.safetensors").exists()


def test_calibration_data_given_to_a_method_that_does_not_calibrate_is_said_in_the_message(
    write_config: Callable[..., Path], report_file: Path, eval_jsonl: Path
) -> None:
    config = write_config("bf16", calibration={"uri": f"file://{eval_jsonl}", "samples": 8},
                          evaluation={"uri": f"file://{eval_jsonl}", "maxPerplexityIncreasePercent": 100.0,
                                      "maxSamples": 4, "sequenceLength": 32})
    assert runner.main(["--config", str(config)]) == contract.EXIT_OK
    message = json.loads(report_file.read_bytes())["message"]
    assert "calibration.uri is set but bf16 does not calibrate" in message, message
