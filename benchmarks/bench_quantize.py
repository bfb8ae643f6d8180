"""Benchmark: every quantization method side by side with the original model, in one run.

For SmolLM2-135M-Instruct (the embedded real model, default), a model directory
(``--model``) or a random-weight preset (``--preset``, speed only), this loads the original
once and each method's quantized model through the same code the QuantizeJob runtime uses
(``kubeforge_runtime.quantize.methods``), and measures, with the runtime's own functions
(``kubeforge_runtime.quantize.metrics``):

* size: state-dict payload bytes of the whole model against the original's, and of the
  decoder's linear weights alone; the int8/int4 methods also put the embedding and
  ``lm_head`` in int8 (the API's ``quantizeEmbeddings``, on by default;
  ``--no-quantize-embeddings`` keeps them as they are);
* decode latency at batch 1 and batch 8 (``--batches``): through ``metrics.served_latency``
  (the server's own engine and compile plan) where the runtime has it, else eager greedy
  ``generate()`` (``metrics.latency`` at batch 1; the same loop over 8 copies of each prompt
  at batch 8); the path measured is printed under the table. Eager paths are timed in
  interleaved rounds (each model once per round, median per model) so a shared machine's slow
  moments hit all models alike;
* perplexity on real text (the first ``--eval-paragraphs`` paragraphs of the runtime's
  reference text) and the task metric (``--task``) with their change against the original;
* ``int4-weight-only-awq`` is calibrated on data the evaluation does not see: ``--calibration``
  (JSONL), else the reference-text paragraphs after the evaluation ones; its row sits next to
  ``int4-weight-only``, the same method uncalibrated, measured on the same data.

int8-dynamic's eager CPU forward over a batched prefill goes through torchao's
``_int_scaled_matmul_cpu`` and is very slow: its task metric is measured on the first
``--dynamic-task-samples`` records only, against the original's score on the same records
(the row says so).

Run::

    python benchmarks/bench_quantize.py --task examples/volumes/data/text-classification-test.jsonl
    python benchmarks/bench_quantize.py --quick      # fewer windows, tokens and repeats (CI)
    python benchmarks/bench_quantize.py --size-only  # sizes only, seconds
    python benchmarks/bench_quantize.py --no-latency # sizes and quality, nothing timed
    python benchmarks/bench_quantize.py --methods int8-weight-only --compare-embeddings --no-latency
                                                     # the embedding's share of int8's quality loss
    python benchmarks/bench_quantize.py --device cuda   # on a CUDA GPU (not run here: no GPU)

The README's "Measured" section holds the last full run with its command.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))

from kubeforge_runtime import embedded, evaluate, models, tiny  # noqa: E402
from kubeforge_runtime.quantize import data, methods, metrics  # noqa: E402

log = logging.getLogger("bench_quantize")

METHOD_ORDER = ("int8-dynamic", "int8-weight-only", "int4-weight-only", "int4-weight-only-awq", "fp16", "bf16")


def _task(model: Any, tokenizer: Any, args: argparse.Namespace, samples: int) -> float:
    fmt = "chat" if '"messages"' in args.task.read_text().split("\n", 1)[0] else "prompt-completion"
    return evaluate.evaluate(model, tokenizer, args.task, fmt, args.metric, samples)["value"]


def _static_measurements(model: Any, windows: list[Any], tokenizer: Any, args: argparse.Namespace,
                         task_samples: int | None = None) -> dict[str, Any]:
    row = {
        "bytes": metrics.state_dict_bytes(model),
        "linearWeightBytes": metrics.linear_weight_bytes(model),
        "fullPrecisionLinearLayers": len(metrics.unquantized_linear_layers(model)),
    }
    if args.size_only:
        return row
    row["perplexity"] = metrics.perplexity(model, windows).perplexity
    if args.task:
        row["taskSamples"] = task_samples or args.task_samples
        row["task"] = _task(model, tokenizer, args, row["taskSamples"])
    return row


def _compile(model: Any) -> None:
    """Compile ``model.forward`` for decoding, the way transformers documents it.

    A static KV cache gives every decode step the same shapes, so one graph serves all
    steps (a dynamic cache recompiles or graph-breaks at each length: measured 10x slower
    than eager here). ``freezing`` lets inductor treat weights as constants, which is what
    turns torchao's int8 dequantize-then-matmul into oneDNN int8 GEMMs on CPU.
    """
    import torch
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, dynamic=False)


def _eager_latency(model: Any, prompts: list[Any], batch: int, args: argparse.Namespace, pad: int | None,
                   repeats: int) -> list[float]:
    """ms/token of eager greedy decoding at ``batch``: ``metrics.latency`` at batch 1; at
    batch b the same prompts, each repeated b times in one ``generate()`` (equal lengths, no
    padding), exactly ``new_tokens`` new tokens; the figure is wall time / new tokens, what one
    of b concurrent clients sees."""
    if batch == 1:
        return metrics.latency(model, prompts, new_tokens=args.new_tokens, warmup=0, repeats=repeats,
                               pad_token_id=pad).runs_ms_per_token
    import torch

    device = next(model.parameters()).device
    runs = []
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            for prompt in prompts:
                ids = prompt.unsqueeze(0).repeat(batch, 1).to(device)
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
            runs.append((time.perf_counter() - started) * 1000.0 / (len(prompts) * args.new_tokens))
    return runs


def _latency_rounds(
    loaded: dict[str, Any], prompts: list[Any], args: argparse.Namespace, pad: int | None, key: str, batch: int = 1
) -> None:
    """Time all models in interleaved rounds at ``batch``; store the median under ``key``.

    Interleaving (every model once per round) spreads a shared machine's slow moments over
    all models instead of charging them to whichever model ran then.
    """
    runs: dict[str, list[float]] = {name: [] for name in loaded}
    for name, (model, _row) in loaded.items():
        started = time.perf_counter()
        _eager_latency(model, prompts, batch, args, pad, args.warmup)
        log.info("%s %s warm-up: %.1f s", name, key, time.perf_counter() - started)
    for round_ in range(args.repeats):
        for name, (model, _row) in loaded.items():
            runs[name].extend(_eager_latency(model, prompts, batch, args, pad, 1))
        log.info("%s round %d/%d done", key, round_ + 1, args.repeats)
    for name, (_model, row) in loaded.items():
        row[key] = statistics.median(runs[name])
        row[key + "Runs"] = runs[name]


def _served_latencies(loaded: dict[str, Any], prompts: list[Any], tokenizer: Any, args: argparse.Namespace) -> str:
    """Latency through the server's engine (``metrics.served_latency``), per model; the path."""
    path = ""
    for name, (model, row) in loaded.items():
        started = time.perf_counter()
        try:
            served = metrics.served_latency(model, tokenizer, prompts, batch_sizes=tuple(args.batches),
                                            new_tokens=args.new_tokens, warmup=args.warmup, repeats=args.repeats)
        except Exception:  # keep the other models' figures; the row shows n/a
            log.exception("%s: served latency failed after %.0f s", name, time.perf_counter() - started)
            continue
        for batch, result in served.batches.items():
            row[f"b{batch}MsPerToken"] = result.ms_per_token
            row[f"b{batch}MsPerTokenRuns"] = result.runs_ms_per_token
        path = served.path
        log.info("%s served latency in %.0f s", name, time.perf_counter() - started)
    return path


def _decode_latencies(loaded: dict[str, Any], prompts: list[Any], tokenizer: Any, args: argparse.Namespace,
                      pad: int | None) -> str:
    """Decode latency of every model at every ``--batches`` size; returns the path measured."""
    if hasattr(metrics, "served_latency") and not args.eager:
        return "server engine: " + _served_latencies(loaded, prompts, tokenizer, args)
    for batch in args.batches:
        _latency_rounds(loaded, prompts, args, pad, f"b{batch}MsPerToken", batch)
    return "eager generate(), interleaved rounds"


FP_EMBEDDINGS = "(emb. fp32)"
"""Row-name suffix of a ``--compare-embeddings`` row: the same method, embedding and lm_head kept."""


def _variants(args: argparse.Namespace) -> list[tuple[str, bool, int | None]]:
    """(method, quantize embeddings, int8 linear group) per row: each method as asked, and with
    ``--compare-embeddings`` each int8/int4 method once more with its embeddings in full
    precision, so the embedding's share of the size and quality change shows in one run; with
    ``--int8-linear-groups``, int8-weight-only once more per group size of its linears."""
    rows: list[tuple[str, bool, int | None]] = []
    for name in args.methods:
        rows.append((name, args.embeddings, None))
        if args.compare_embeddings and args.embeddings and name.startswith("int"):
            rows.append((name, False, None))
        if name == "int8-weight-only":
            rows += [(name, args.embeddings, group) for group in args.int8_linear_groups]
    return rows


def _int8_grouped(group: int) -> Any:
    """int8-weight-only with one scale per ``group`` values of a linear's row (not per row)."""

    def config(_group_size: int) -> Any:
        from torchao.quantization import Int8WeightOnlyConfig, PerGroup

        return Int8WeightOnlyConfig(granularity=PerGroup(group))

    return methods.TorchAoMethod(f"int8-weight-only (linears in groups of {group})", "bf16", config)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        if args.preset:
            model_dir = tiny.build_tiny_llama(Path(tmp) / "model", preset=args.preset, seed=0)
        else:
            model_dir = args.model or embedded.ensure()
        tokenizer = models.load_tokenizer(model_dir)
        reference = data.reference_texts()
        texts = reference[: args.eval_paragraphs]
        windows = data.make_windows(tokenizer, texts, args.sequence_length)
        if args.calibration:
            calibration_texts = data.load_texts(f"file://{args.calibration.resolve()}", args.calibration_samples)
        else:  # the reference paragraphs the evaluation does not read
            calibration_texts = reference[args.eval_paragraphs:][: args.calibration_samples]
        calibration = data.make_windows(tokenizer, calibration_texts, args.sequence_length) if calibration_texts else []
        prompts = data.latency_prompts(windows, args.prompts, args.prompt_tokens)
        pad = tokenizer.pad_token_id

        # Everything stays loaded (the small preset is 100 MB in fp32) so latency can be
        # measured in interleaved rounds.
        original = models.load_causal_lm(model_dir, device=args.device).eval()
        params = original.num_parameters()
        log.info("original: %s, %.1f M parameters, %d threads", model_dir, params / 1e6, torch.get_num_threads())
        failed: dict[str, str] = {}
        loaded: dict[str, tuple[Any, dict[str, Any]]] = {
            "original": (original, _static_measurements(original, windows, tokenizer, args))}
        log.info("original: perplexity %s, task %s", loaded["original"][1].get("perplexity", "not measured"),
                 loaded["original"][1].get("task", "not measured"))
        for method_name, embeddings, linear_group in _variants(args):
            name = method_name if embeddings == args.embeddings else f"{method_name} {FP_EMBEDDINGS}"
            method = methods.get_method(method_name) if linear_group is None else _int8_grouped(linear_group)
            name = name if linear_group is None else method.name
            try:
                method.check_supported(args.device, args.group_size)
            except methods.UnsupportedMethodError as exc:
                log.warning("%s skipped: %s", name, exc)
                continue
            if method.calibrates and not calibration:
                log.warning("%s skipped: no calibration data (--calibration, or fewer --eval-paragraphs)", name)
                continue
            started = time.perf_counter()
            capped = args.dynamic_task_samples if method_name == "int8-dynamic" and args.task else None
            try:
                model = method.load_quantized(model_dir, args.device, args.group_size, embeddings=embeddings,
                                              calibration=calibration if method.calibrates else None)
                quantize_seconds = time.perf_counter() - started
                row = _static_measurements(model, windows, tokenizer, args, capped)
            except Exception as exc:  # one method failing must not lose the others' figures: say so, go on
                log.exception("%s failed after %.0f s; its row is left out", name, time.perf_counter() - started)
                failed[name] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                continue
            row["quantizeSeconds"] = quantize_seconds
            if capped:  # the original on the same capped records, as this row's own baseline
                row["taskBase"] = _task(original, tokenizer, args, capped)
            loaded[name] = (model, row)
            log.info("%s: loaded, perplexity %s, task %s", name, row.get("perplexity", "not measured"),
                     row.get("task", "not measured"))

        latency_path = ""
        if not args.size_only and args.latency:
            latency_path = _decode_latencies(loaded, prompts, tokenizer, args, pad)
        if args.compile and not args.size_only and args.latency:
            for name, (model, row) in loaded.items():
                started = time.perf_counter()
                try:
                    _compile(model)
                    metrics.latency(model, prompts[:1], new_tokens=args.new_tokens, warmup=0, repeats=1, pad_token_id=pad)
                except Exception as exc:  # report a model torch.compile cannot handle; go on
                    log.warning("%s: torch.compile failed: %s", name, str(exc).splitlines()[0])
                    row["compiledMsPerToken"] = None
                row["compileSeconds"] = time.perf_counter() - started
                log.info("%s compiled in %.0f s", name, row["compileSeconds"])
            compiled = {n: v for n, v in loaded.items() if "compiledMsPerToken" not in v[1]}
            _latency_rounds(compiled, prompts, args, pad, "compiledMsPerToken")  # batch 1
        rows = {name: row for name, (_model, row) in loaded.items()}
    return {"model": f"{args.preset} preset (random weights)" if args.preset else str(model_dir), "parameters": params, "threads": torch.get_num_threads(), "rows": rows, "failed": failed, "settings": {
        "device": args.device, "quantizeEmbeddings": args.embeddings, "sizeOnly": args.size_only,
        "groupSize": args.group_size, "prompts": args.prompts, "promptTokens": args.prompt_tokens,
        "newTokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
        "sequenceLength": args.sequence_length, "evalWindows": len(windows), "compile": args.compile and args.latency,
        "task": str(args.task) if args.task else None, "metric": args.metric, "taskSamples": args.task_samples,
        "batches": args.batches if args.latency else [],
        "latencyPath": latency_path or "not timed (--no-latency)", "evalParagraphs": len(texts),
        "evalTokens": sum(len(w) for w in windows), "calibration": str(args.calibration) if args.calibration else
        f"reference text paragraphs {args.eval_paragraphs + 1}-{args.eval_paragraphs + len(calibration_texts)}",
        "calibrationTokens": sum(len(w) for w in calibration),
    }}


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = rows["original"]
    width = max(22, *(len(name) for name in rows))
    if result["settings"]["sizeOnly"]:
        lines = [f"{'method':<{width}} {'bytes':>11} {'of fp32':>8} {'smaller':>8} {'linear':>7}"]
        for name, row in rows.items():
            lines.append(f"{name:<{width}} {row['bytes']:>11,} {row['bytes'] / base['bytes']:>7.3f}x "
                         f"{base['bytes'] / row['bytes']:>7.2f}x {base['linearWeightBytes'] / row['linearWeightBytes']:>6.2f}x")
        lines.append(f"\n{result['model']}; sizes only (--size-only); int4 group size {result['settings']['groupSize']}; "
                     f"embeddings {'int8' if result['settings']['quantizeEmbeddings'] else 'full precision'}.")
        return "\n".join(lines)
    s = result["settings"]
    batches = s["batches"]
    head = f"{'method':<{width}} {'of fp32':>8} {'linear':>7}"
    for batch in batches:
        head += f" {f'b{batch} ms/tok':>11} {'speedup':>8}"
    if s["compile"]:
        head += f" {'compiled ms/tok':>15} {'speedup':>8}"
    head += f" {'perplexity':>11} {'change':>9}"
    if s["task"]:
        head += f" {s['metric']:>10} {'change':>8}"
    lines = [head, "-" * len(head)]
    notes = []
    for name, row in rows.items():
        line = (f"{name:<{width}} {row['bytes'] / base['bytes']:>7.3f}x "
                f"{base['linearWeightBytes'] / row['linearWeightBytes']:>6.2f}x")
        for batch in batches:
            v, b = row.get(f"b{batch}MsPerToken"), base.get(f"b{batch}MsPerToken")
            line += f" {v:>11.2f} {b / v:>7.2f}x" if v and b else f" {'n/a':>11} {'':>8}"
        if s["compile"]:
            c, b = row.get("compiledMsPerToken"), base.get("compiledMsPerToken")
            line += f" {c:>15.2f} {b / c:>7.2f}x" if c and b else f" {'n/a':>15} {'':>8}"
        change = (row["perplexity"] - base["perplexity"]) / base["perplexity"] * 100
        line += f" {row['perplexity']:>11.2f} {change:>+8.3f}%"
        if s["task"]:
            task_base = row.get("taskBase", base["task"])
            mark = "*" if "taskBase" in row else " "
            line += f" {row['task'] * 100:>9.1f}%{mark}{(row['task'] - task_base) * 100:>+6.1f}pt"
            if "taskBase" in row:
                notes.append(f"* {name}: {s['metric']} on the first {row['taskSamples']} records only (its eager "
                             f"batched prefill is very slow on CPU); change against the original's "
                             f"{task_base * 100:.1f}% on the same records.")
        lines.append(line)
    lines.append(
        f"\n{result['model']}, {result['parameters'] / 1e6:.1f} M parameters, {result['threads']} threads; "
        f"device {s['device']}, embeddings {'int8' if s['quantizeEmbeddings'] else 'full precision'}; "
        f"'of fp32' = whole state dict against the original, 'linear' = decoder linear weights smaller; "
        + (f"latency ({s['latencyPath']}) = greedy decode of {s['prompts']} prompt(s) of {s['promptTokens']} tokens x "
           f"{s['newTokens']} new tokens at batch b, median of {s['repeats']} passes after {s['warmup']} warm-up; "
           f"speedups against 'original'; " if batches else "latency not timed (--no-latency); ")
        + f"int4 group size {s['groupSize']}; perplexity on {s['evalParagraphs']} "
        f"reference paragraphs ({s['evalTokens']} tokens); int4-weight-only-awq calibrated on {s['calibration']} "
        f"({s['calibrationTokens']} tokens)" + (f"; {s['metric']} on {s['taskSamples']} records of {s['task']}." if s["task"] else ".")
    )
    lines.extend(notes)
    lines.extend(f"{name}: FAILED, no row: {why}" for name, why in result.get("failed", {}).items())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts, tokens and repeats")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd decoding")
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--preset", default=None, choices=sorted(tiny.PRESETS),
                        help="a random-weight preset instead of a real model (speed only: its quality figures are noise)")
    parser.add_argument("--task", type=Path, default=None,
                        help="held-out JSONL (prompt-completion or chat) to measure a task metric on every model")
    parser.add_argument("--metric", default="accuracy", choices=evaluate.METRICS)
    parser.add_argument("--task-samples", type=int, default=100)
    parser.add_argument("--dynamic-task-samples", type=int, default=20,
                        help="int8-dynamic's task metric on this many records only (its eager CPU prefill is slow)")
    parser.add_argument("--eval-paragraphs", type=int, default=20,
                        help="perplexity on this many reference-text paragraphs (of 40); the rest calibrate AWQ")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="JSONL calibration data for int4-weight-only-awq (default: the reference paragraphs "
                        "after the evaluation ones)")
    parser.add_argument("--calibration-samples", type=int, default=128, help="calibration records read")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes timed")
    parser.add_argument("--eager", action="store_true",
                        help="time eager generate() even where the runtime has the server's path")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_ORDER), choices=METHOD_ORDER)
    # 32: the small preset's down_proj is 1376 wide, which 64 and 128 do not divide (torchao
    # would leave those layers in fp32 and the int4 row would understate the compression).
    parser.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128))  # SmolLM2: 576 wide, not /128
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the models run (cuda: the CUDA kernels of each method, e.g. int4 tinygemm)")
    parser.add_argument("--no-quantize-embeddings", dest="embeddings", action="store_false",
                        help="keep the embedding and lm_head in full precision (the API's quantizeEmbeddings: false)")
    parser.add_argument("--size-only", action="store_true",
                        help="only the sizes (no perplexity, task or latency): seconds instead of minutes")
    parser.add_argument("--compare-embeddings", action="store_true",
                        help=f"also each int8/int4 method with the embedding and lm_head in full precision (rows "
                        f"marked {FP_EMBEDDINGS!r}): what quantizing them costs in quality and saves in bytes")
    parser.add_argument("--int8-linear-groups", type=int, nargs="*", default=[], metavar="G",
                        help="also int8-weight-only with its linears in groups of G values (one scale per group; "
                             "the method itself uses methods.INT8_LINEAR_GROUP)")
    parser.add_argument("--no-latency", dest="latency", action="store_false",
                        help="sizes and quality only (perplexity, task): nothing timed, so it may run niced "
                        "outside the benchmark lock")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible here")
    # Batch-1 decoding of SmolLM2 in fp32 takes ~0.1 s per token on an idle 2-core CPU: one prompt
    # x 16 tokens, median of 3 interleaved passes, keeps seven models near a minute per batch size.
    args.prompts, args.prompt_tokens, args.sequence_length = (1, 16, 128) if args.quick else (1, 32, 256)
    args.new_tokens, args.warmup, args.repeats = (8, 1, 3) if args.quick else (16, 1, 3)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "torch", "torchao"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    started = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - started
    table = render(result)
    log.info("done in %.0f s", result["seconds"])
    sys.stdout.write(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
