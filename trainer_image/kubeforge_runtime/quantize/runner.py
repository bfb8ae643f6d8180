"""The QuantizeJob entry point: quantize a model, measure what it cost, gate and save it.

Run in the QuantizeJob pod as ``python -m kubeforge_runtime.quantize --config PATH``. Steps
(each logged as one progress line):

1. parse the config (``config.py``); check at once that this machine can run the method
   (``methods.py``) - before any model is loaded;
2. load the original model (a LoRA adapter is merged into its base first) and measure its
   size, per-token latency and perplexity on the evaluation set, and its task metric - unless
   its FineTuneJob's lineage record holds that figure for the same files and records
   (``inherited.py``; the report's ``task.beforeSource`` says which);
3. load it again quantized through transformers' torchao integration (a calibrating method
   first reads ``calibration.uri`` and runs it through the model), measure the same things on
   the same windows and prompts; for a calibrating method, also the same method without
   calibration (quality only), so the report shows what the calibration bought;
4. save the quantized model, tokenizer, ``kubeforge.json`` lineage and the full report to the
   output; if the perplexity rose more than ``maxPerplexityIncreasePercent`` the output is
   still saved but marked rejected (a ``REJECTED`` file, ``"gatePassed": false``);
5. write the compact report to the termination-message path and exit.

Exit codes (``contract``): 0 gate passed; 78 (EXIT_CONFIG_ERROR) invalid config, unusable
model/data, or a method this hardware cannot run - retrying cannot help; 79
(EXIT_QUALITY_GATE_FAILED) the quality gate failed; 1 anything else (the Job may retry).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import contract, models, storage
from .. import lineage as lineage_mod
from ..data import DataError, parse_jsonl
from . import data, inherited, methods, metrics, speed
from . import report as reporting
from .config import CALIBRATED_METHODS, ConfigError, QuantizeConfig, load_config

log = logging.getLogger(__name__)

REJECTED_MARKER = models.REJECTED_MARKER
# Latency protocol: one prompt of 32 tokens, 16 greedy tokens per pass, one warm-up pass, the
# median of 3 timed passes. Batch-1 decoding of a small model is memory-bound on a CPU (about
# 0.1 s per token for SmolLM2-135M in fp32 on the 2-core development machine), and every timed
# token is paid twice (input and output): 48 timed tokens per model keep the main job's
# quantization step under a minute there; the passes of one run agreed within a few per cent.
LATENCY_PROMPTS = 1
"""Prompts per latency pass (the first evaluation windows)."""
LATENCY_PROMPT_TOKENS = 32
LATENCY_NEW_TOKENS = 16
LATENCY_WARMUP = 1
LATENCY_REPEATS = 3
LATENCY_BATCHES = (1, 8)
"""Concurrent requests per latency pass: one client, and eight at once (the compact report's
``latencyMsPerToken`` is batch 1). Timed through the server's engine and ``engine.compile``
plan (``metrics.served_latency``), so the report predicts what the server does."""

# Files a previous attempt of this Job may have left in the output; removed before saving so
# a retried pod never leaves, say, an int4 pytorch_model.bin next to a new model.safetensors.
_STALE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", REJECTED_MARKER)


class _Failure(Exception):
    """A failure with a report reason and an exit code."""

    def __init__(self, reason: str, message: str, code: int) -> None:
        super().__init__(message)
        self.reason, self.message, self.code = reason, message, code


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _materialize_full_model(uri: str, scratch: Path, path: Path | None = None) -> Path:
    """A directory holding a full model: the input itself, or an adapter merged into its base
    (``path``: ``uri`` already resolved)."""
    path = path or models.resolve_model_dir(uri)
    if not models.is_adapter_dir(path):
        return path
    log.info("model.uri is a LoRA adapter: merging it into its base model before quantizing")
    merged = models.load_causal_lm(str(path), merge_adapter=True)
    target = scratch / "merged"
    merged.save_pretrained(str(target))
    models.load_tokenizer(str(path)).save_pretrained(str(target))
    del merged
    return target


def _measure(model: Any, windows: list[Any], prompts: list[Any], tokenizer: Any) -> dict[str, Any]:
    ppl = metrics.perplexity(model, windows)
    served = metrics.served_latency(
        model,
        tokenizer,
        prompts,
        batch_sizes=LATENCY_BATCHES,
        new_tokens=LATENCY_NEW_TOKENS,
        warmup=LATENCY_WARMUP,
        repeats=LATENCY_REPEATS,
    )
    lat = served.batches[1]
    return {
        "bytes": metrics.state_dict_bytes(model),
        "linearWeightBytes": metrics.linear_weight_bytes(model),
        "fullPrecisionLinearLayers": len(metrics.unquantized_linear_layers(model)),
        "perplexity": ppl.perplexity,
        "evalTokens": ppl.tokens,
        "latencyMsPerToken": lat.ms_per_token,
        "latencyRunsMsPerToken": lat.runs_ms_per_token,
        "latencyByBatch": {str(b): r.ms_per_token for b, r in served.batches.items()},
        "latencyPath": served.path,
        "latencyCompiled": served.compiled,
    }


def _task_metric(model: Any, tokenizer: Any, cfg: QuantizeConfig, which: str) -> dict[str, Any] | None:
    """The held-out task metric of ``model`` (``evaluation.task``), or None when not asked for."""
    task = cfg.evaluation.task
    if task is None:
        return None
    from .. import evaluate

    path = storage.resolve(task.uri)
    fmt = parse_jsonl(path, None)[1]  # the records say whether they are prompt-completion or chat
    result = evaluate.evaluate(model, tokenizer, path, fmt, task.metric, task.max_samples)
    log.info("%s model: %s %.1f%% on %d records", which, task.metric, result["value"] * 100, result["samples"])
    return result


def _task_before(model: Any, tokenizer: Any, cfg: QuantizeConfig, input_dir: Path,
                 input_digest: str) -> tuple[dict[str, Any] | None, str | None]:
    """The input model's task metric and where it came from: its FineTuneJob's lineage record
    when that measured the same files on the same records (``inherited.py``), else measured."""
    task = cfg.evaluation.task
    if task is None:
        return None, None
    return inherited.task_metric_before(input_dir, input_digest, storage.resolve(task.uri), task.metric,
                                        task.max_samples, lambda: _task_metric(model, tokenizer, cfg, "original"))


def _clear_stale(out_dir: Path) -> None:
    for pattern in _STALE_PATTERNS:
        for stale in out_dir.glob(pattern):
            stale.unlink()


def _check_output_apart(model_uri: str, output_uri: str, out_dir: Path) -> None:
    """Refuse an output that is, contains or lies inside the model being quantized (or, for a
    LoRA adapter, its base): saving clears weight files in the output, so the quantizer would
    delete its own input. Compared as resolved paths (symbolic links followed)."""
    source = models.resolve_model_dir(model_uri)
    inputs = [source]
    if models.is_adapter_dir(source):
        inputs.append(models.resolve_model_dir(models.adapter_base_uri(source)))
    out = out_dir.resolve()
    for given in inputs:
        src = given.resolve()
        if out == src:
            where = "is"
        elif out.is_relative_to(src):
            where = "lies inside"
        elif src.is_relative_to(out):
            where = "contains"
        else:
            continue
        raise _Failure(
            reporting.REASON_CONFIG_ERROR,
            f"output.uri {output_uri!r} ({out}) {where} the model being quantized ({src}): the quantizer "
            "replaces the weight files in its output and would delete its own input; choose an output.uri "
            f"outside {src}",
            contract.EXIT_CONFIG_ERROR,
        )


@dataclass
class _Calibration:
    """The calibration set a calibrating method reads: windows and where they came from."""

    uri: str
    texts: int
    digest: str
    windows: list[Any]

    def lineage(self) -> dict[str, Any]:
        return {"uri": self.uri, "texts": self.texts, "windows": len(self.windows),
                "tokens": sum(len(w) for w in self.windows), "digest": self.digest}


def _calibration_windows(cfg: QuantizeConfig, tokenizer: Any) -> _Calibration:
    """The first ``calibration.samples`` records at ``calibration.uri``, tokenized and cut into
    windows of ``evaluation.sequenceLength`` tokens (the config guarantees a uri)."""
    uri = cfg.calibration.uri
    assert uri is not None, "a calibrating method's config has calibration.uri (config.py)"
    texts = data.load_texts(uri, cfg.calibration.samples)
    windows = data.make_windows(tokenizer, texts, cfg.evaluation.sequence_length)
    log.info("calibration: %d texts -> %d windows (%d tokens) from %s", len(texts), len(windows),
             sum(len(w) for w in windows), uri)
    return _Calibration(uri=uri, texts=len(texts), digest=lineage_mod.records_digest(texts), windows=windows)


def _uncalibrated(cfg: QuantizeConfig, source: Path, device: str, windows: list[Any], tokenizer: Any,
                  before: dict[str, Any]) -> dict[str, Any]:
    """Quality of the same method without calibration on the same evaluation data: what the
    calibration bought (perplexity, and the task metric when one is asked for)."""
    name = CALIBRATED_METHODS[cfg.method]
    log.info("measuring %s without calibration on the same data, for comparison", name)
    model = methods.get_method(name).load_quantized(source, device, cfg.group_size, embeddings=cfg.quantize_embeddings)
    ppl = metrics.perplexity(model, windows).perplexity
    task = _task_metric(model, tokenizer, cfg, "uncalibrated")
    del model
    gc.collect()
    return {"method": name, "perplexity": ppl,
            "perplexityIncreasePercent": (ppl - before["perplexity"]) / before["perplexity"] * 100.0,
            **({"task": {"metric": task["metric"], "value": task["value"]}} if task else {})}


def run(cfg: QuantizeConfig) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Quantize per ``cfg``; return (compact report, full report, exit code)."""
    import torch

    device = _device()
    try:
        method = methods.get_method(cfg.method)
    except KeyError as exc:
        raise _Failure(reporting.REASON_CONFIG_ERROR, str(exc), contract.EXIT_CONFIG_ERROR) from None
    log.info("[1/5] checking that %s can run here (%s)", cfg.method, device)
    try:
        method.check_supported(device, cfg.group_size)
    except methods.UnsupportedMethodError as exc:
        raise _Failure(reporting.REASON_UNSUPPORTED_METHOD, str(exc), contract.EXIT_CONFIG_ERROR) from None
    calibration_note = ""
    if cfg.calibration.uri is not None and not method.calibrates:
        # Said in the report's message (the Succeeded/QualityGateFailed condition), not only in
        # the log: a setting the user believes applied and is not must be visible.
        calibration_note = (f"; calibration.uri is set but {cfg.method} does not calibrate: the calibration data "
                            "was not read")
        log.warning("calibration.uri is set, but %s does not calibrate: not read", cfg.method)

    try:
        out_dir = storage.output_path(cfg.output.uri)  # s3://: a staging directory, uploaded at the end
        if storage.is_s3(cfg.output.uri):
            storage.check_s3_ready(cfg.output.uri, "output.uri")
            if contract.uris_overlap(cfg.model.uri, cfg.output.uri):
                raise _Failure(reporting.REASON_CONFIG_ERROR,
                               f"output.uri {cfg.output.uri!r} overlaps model.uri {cfg.model.uri!r}: the quantizer "
                               "replaces the weight files in its output and would delete its own input; choose "
                               "another output.uri", contract.EXIT_CONFIG_ERROR)
        _check_output_apart(cfg.model.uri, cfg.output.uri, out_dir)
        with tempfile.TemporaryDirectory(prefix="kubeforge-quantize-") as scratch:
            input_dir = models.resolve_model_dir(cfg.model.uri)  # as given (an adapter stays an adapter)
            source = _materialize_full_model(cfg.model.uri, Path(scratch), input_dir)
            input_files = lineage_mod.model_files_digest(input_dir)
            tokenizer = models.load_tokenizer(str(source))
            texts = data.load_texts(cfg.evaluation.uri, cfg.evaluation.max_samples)
            texts_digest = lineage_mod.records_digest(texts)
            windows = data.make_windows(tokenizer, texts, cfg.evaluation.sequence_length)
            prompts = data.latency_prompts(windows, LATENCY_PROMPTS, LATENCY_PROMPT_TOKENS)
            log.info("evaluation: %d texts -> %d windows of <= %d tokens", len(texts), len(windows), cfg.evaluation.sequence_length)
            calibration = _calibration_windows(cfg, tokenizer) if method.calibrates else None

            log.info("[2/5] measuring the original model")
            original = models.load_causal_lm(str(source), device=device).eval()
            before = _measure(original, windows, prompts, tokenizer)
            task_before, task_source = _task_before(original, tokenizer, cfg, input_dir, input_files["digest"])
            original_dtype = str(next(original.parameters()).dtype).replace("torch.", "")
            del original
            gc.collect()
            log.info(
                "original: %d bytes, perplexity %.4f, %.3f ms/token",
                before["bytes"], before["perplexity"], before["latencyMsPerToken"],
            )

            log.info("[3/5] quantizing with %s and measuring", cfg.method)
            started = time.perf_counter()
            quantized = method.load_quantized(source, device, cfg.group_size, embeddings=cfg.quantize_embeddings,
                                              calibration=calibration.windows if calibration else None)
            quantize_seconds = time.perf_counter() - started
            skipped = metrics.unquantized_linear_layers(quantized) if cfg.method.startswith("int") else []
            linear_count = len(metrics.linear_layers(quantized))
            if skipped and len(skipped) == linear_count:
                # torchao skips layers whose width the group size does not divide; when it
                # skips all of them the "quantized" model is the original.
                raise _Failure(
                    reporting.REASON_CONFIG_ERROR,
                    f"{cfg.method} quantized no linear layer (groupSize {cfg.group_size} must divide the "
                    "layers' input widths); choose a smaller groupSize",
                    contract.EXIT_CONFIG_ERROR,
                )
            if skipped:
                log.warning(
                    "%d of %d linear layers left in full precision (groupSize %d does not divide their "
                    "input width), e.g. %s; a smaller groupSize quantizes them",
                    len(skipped), linear_count, cfg.group_size, skipped[0],
                )
            after = _measure(quantized, windows, prompts, tokenizer)
            task_after = _task_metric(quantized, tokenizer, cfg, "quantized")
            log.info(
                "quantized: %d bytes, perplexity %.4f, %.3f ms/token",
                after["bytes"], after["perplexity"], after["latencyMsPerToken"],
            )
            uncalibrated = _uncalibrated(cfg, source, device, windows, tokenizer, before) if calibration else None
    except (models.ModelLoadError, storage.StorageError, data.EvaluationDataError, DataError) as exc:
        raise _Failure(reporting.REASON_CONFIG_ERROR, str(exc), contract.EXIT_CONFIG_ERROR) from None

    increase = (after["perplexity"] - before["perplexity"]) / before["perplexity"] * 100.0
    # A NaN/inf perplexity (a broken kernel) must fail the gate, never pass it by comparison.
    gate_passed = math.isfinite(increase) and increase <= cfg.evaluation.max_perplexity_increase_percent
    task_numbers, task_report, drop = "", None, None
    if task_before is not None and task_after is not None:
        drop = (task_before["value"] - task_after["value"]) * 100.0
        limit = cfg.evaluation.max_accuracy_drop_points
        if limit is not None:
            gate_passed = gate_passed and drop <= limit
        task_report = {"metric": task_before["metric"], "before": task_before["value"], "after": task_after["value"],
                       "samples": task_after["samples"], "beforeSource": task_source}
        recorded = " (input's figure from its lineage)" if task_source != inherited.MEASURED else ""
        task_numbers = (f"{task_before['metric']} {task_before['value']:.1%}{recorded} -> {task_after['value']:.1%} "
                        f"({-drop:+.1f} points" + (f", limit -{limit:g}" if limit is not None else "") + "), ")
    numbers = (
        f"perplexity {before['perplexity']:.4f} -> {after['perplexity']:.4f} "
        f"({increase:+.3f}%, limit {cfg.evaluation.max_perplexity_increase_percent:g}%), {task_numbers}"
        f"size {before['bytes']} -> {after['bytes']} bytes "
        f"({before['bytes'] / after['bytes']:.2f}x smaller), latency "
        f"{before['latencyMsPerToken']:.3f} -> {after['latencyMsPerToken']:.3f} ms/token"
    )
    if uncalibrated is not None:
        task = uncalibrated.get("task")
        numbers += (f"; {uncalibrated['method']} without calibration, same data: perplexity "
                    f"{uncalibrated['perplexity']:.4f} ({uncalibrated['perplexityIncreasePercent']:+.3f}%)"
                    + (f", {task['metric']} {task['value']:.1%}" if task else ""))
    numbers += calibration_note
    latency_note = speed.latency_note(cfg.method, device, after["latencyCompiled"], before["latencyMsPerToken"],
                                      after["latencyMsPerToken"])
    if latency_note:
        numbers += f"; {latency_note}"
    if gate_passed:
        reason, message, code = reporting.REASON_SUCCEEDED, f"{cfg.method}: {numbers}", contract.EXIT_OK
    else:
        reason = reporting.REASON_QUALITY_GATE_FAILED
        message = f"{cfg.method} failed the quality gate: {numbers}; output kept but rejected"
        code = contract.EXIT_QUALITY_GATE_FAILED

    log.info("[4/5] saving to %s", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale(out_dir)
    save_facts = method.save(quantized, out_dir)
    tokenizer.save_pretrained(str(out_dir))

    compact = {
        "originalBytes": before["bytes"],
        "quantizedBytes": after["bytes"],
        "compressionRatio": before["bytes"] / after["bytes"],
        "latencyMsPerToken": {"before": before["latencyMsPerToken"], "after": after["latencyMsPerToken"]},
        "perplexity": {"before": before["perplexity"], "after": after["perplexity"]},
        "perplexityIncreasePercent": increase,
        "maxPerplexityIncreasePercent": cfg.evaluation.max_perplexity_increase_percent,
        **({"task": task_report, "taskDropPoints": drop} if task_report else {}),
        **({"uncalibrated": uncalibrated} if uncalibrated is not None else {}),
        "latencyPath": f"{after['latencyPath']}, batch 1",
        **({"latencyNote": latency_note} if latency_note else {}),
        "gatePassed": gate_passed,
        "method": cfg.method,
        "reason": reason,
        "message": message,
        "outputUri": cfg.output.uri,
    }
    lineage = {
        "kind": "QuantizeJob",
        "name": cfg.name,
        "namespace": cfg.namespace,
        "baseModel": {"uri": cfg.model.uri, **input_files},
        "evaluationData": {"uri": cfg.evaluation.uri, "texts": len(texts), "digest": texts_digest},
        **({"calibrationData": calibration.lineage()} if calibration else {}),
        "quantization": {
            "method": cfg.method,
            "groupSize": cfg.group_size if cfg.method.startswith("int4") else None,
            "quantizeEmbeddings": cfg.quantize_embeddings,
            "device": device,
            "originalDtype": original_dtype,
            **save_facts,
        },
        "gatePassed": gate_passed,
        "perplexity": {"before": before["perplexity"], "after": after["perplexity"]},
        "evaluation": task_report,
        "size": {"before": before["bytes"], "after": after["bytes"]},
        "configDigest": lineage_mod.json_digest(cfg.model_dump(mode="json", by_alias=True)),
        "code": lineage_mod.code_version(),
        "output": {"uri": cfg.output.uri, **lineage_mod.model_files_digest(out_dir)},
        "createdAt": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    lineage = lineage_mod.seal(lineage, input_dir=input_dir)
    compact["lineageDigest"] = lineage_mod.write(out_dir, lineage)
    lineage_mod.write_model_card(out_dir, lineage, license=lineage_mod.base_license(input_dir))
    full = {
        **compact,
        "before": before,
        "after": after,
        "latency": {
            "path": after["latencyPath"],
            "batches": list(LATENCY_BATCHES),
            "msPerTokenByBatch": {"before": before["latencyByBatch"], "after": after["latencyByBatch"]},
            "prompts": len(prompts),
            "promptTokens": LATENCY_PROMPT_TOKENS,
            "newTokens": LATENCY_NEW_TOKENS,
            "warmupPasses": LATENCY_WARMUP,
            "repeats": LATENCY_REPEATS,
            "statistic": "median",
        },
        "evaluation": {
            "uri": cfg.evaluation.uri,
            "texts": len(texts),
            "windows": len(windows),
            "sequenceLength": cfg.evaluation.sequence_length,
        },
        "quantizeSeconds": quantize_seconds,
        "device": device,
        "torchThreads": torch.get_num_threads(),
        "versions": _versions(),
        "lineage": lineage,
    }
    reporting.write_full(full, out_dir)
    if not gate_passed:
        (out_dir / REJECTED_MARKER).write_text(json.dumps({"reason": reason, "message": message}) + "\n")
    if storage.is_s3(cfg.output.uri):
        # The rejection marker before the lineage record, the lineage record last: a reader that
        # finds kubeforge.json finds a complete output, and a rejected one already marked.
        storage.upload_dir(out_dir, cfg.output.uri, last=(REJECTED_MARKER, models.LINEAGE_FILE), replace=True)
    log.info("[5/5] %s: %s", reason, message)
    return compact, full, code


def _versions() -> dict[str, str]:
    import torch
    import torchao
    import transformers

    return {"torch": torch.__version__, "torchao": torchao.__version__, "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubeforge_runtime.quantize",
        description="Quantize a causal LM, measure size/latency/perplexity before and after, gate, save.",
    )
    parser.add_argument(
        "--config",
        default=f"{contract.CONFIG_DIR}/{contract.CONFIG_FILE}",
        help="the rendered QuantizeJob config (JSON)",
    )
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    method_name = "unknown"
    try:
        cfg = load_config(args.config)
        method_name = cfg.method
        compact, _full, code = run(cfg)
    except ConfigError as exc:
        compact, code = _failure_report(method_name, reporting.REASON_CONFIG_ERROR, str(exc)), contract.EXIT_CONFIG_ERROR
    except _Failure as exc:
        compact, code = _failure_report(method_name, exc.reason, exc.message), exc.code
    except storage.StorageError as exc:  # e.g. the s3:// output refused (access denied, no bucket)
        compact, code = _failure_report(method_name, reporting.REASON_CONFIG_ERROR, str(exc)), contract.EXIT_CONFIG_ERROR
    except Exception as exc:  # report it, then let the Job's backoff decide on a retry
        log.exception("quantization failed")
        compact = _failure_report(method_name, reporting.REASON_INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        code = 1
    if code not in (contract.EXIT_OK, contract.EXIT_QUALITY_GATE_FAILED):
        log.error("%s: %s", compact["reason"], compact["message"])
    path = reporting.write_compact(compact)
    log.info("report written to %s; exit code %d", path or "(nowhere)", code)
    return code


def _failure_report(method: str, reason: str, message: str) -> dict[str, Any]:
    return {"method": method, "reason": reason, "message": message, "gatePassed": False}


__all__ = ["main", "run", "REJECTED_MARKER"]
