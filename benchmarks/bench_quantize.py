"""Benchmark: every quantization method side by side with the original model, in one run.

For the ``small`` preset (Llama-style, ~26 M parameters, random weights) built on the fly,
this loads the original once and each method's quantized model through the same code the
QuantizeJob runtime uses (``kubeforge_runtime.quantize.methods``), and measures, with the
runtime's own functions (``kubeforge_runtime.quantize.metrics``):

* size: state-dict payload bytes of the whole model, and of the decoder's linear weights
  alone; the int8/int4 methods also put the embedding and ``lm_head`` in int8 (the API's
  ``quantizeEmbeddings``, on by default; ``--no-quantize-embeddings`` keeps them as they are);
* per-token latency: greedy decoding of the same prompts, warm-up excluded, median of
  repeated passes; ``--compile`` also times each model after ``torch.compile``;
* perplexity on the built-in evaluation text, and its change in percent.

Latency is measured in interleaved rounds (each model once per round, median per model),
so a shared machine's slow moments hit all models alike; compare within one run.

Run::

    python benchmarks/bench_quantize.py            # all methods, eager
    python benchmarks/bench_quantize.py --quick    # fewer repeats/tokens (CI)
    python benchmarks/bench_quantize.py --compile  # eager and torch.compile'd decode
    python benchmarks/bench_quantize.py --device cuda   # on a CUDA GPU (not run here: no GPU)

Random weights make perplexity ~ vocabulary size and say nothing about task quality; what
the column shows is how far each method moves the model's predictions.

Measured before the embeddings were quantized (what ``--no-quantize-embeddings`` does now) on
the shared 2-core development machine (torch 2.13 CPU, torchao 0.18, transformers 5.24),
``python benchmarks/bench_quantize.py --preset small --compile --threads 1``, 395 s,
other engineers' jobs running alongside (hence one thread and interleaved rounds)::

    method                   bytes  smaller  linear eager ms/tok  speedup compiled ms/tok  speedup  perplexity    change
    original           102,393,856    1.00x   1.00x        20.31    1.00x           16.66    1.00x     8574.55   +0.000%
    int8-dynamic        50,338,432    2.03x   3.97x        40.37    0.50x            6.37    2.61x     8565.32   -0.108%
    int8-weight-only    50,338,432    2.03x   3.97x        22.15    0.92x           12.42    1.34x     8569.47   -0.059%
    int4-weight-only    27,272,192    3.75x   6.40x        13.39    1.52x            6.36    2.62x     8481.48   -1.085%
    fp16                51,196,928    2.00x   2.00x        20.02    1.01x           15.76    1.06x     8574.40   -0.002%
    bf16                51,196,928    2.00x   2.00x        19.80    1.03x           14.60    1.14x     8574.65   +0.001%

Against the public reference (int8: 4x smaller, ~3x lower latency, <1 % quality loss):
int8 linear weights are 3.97x smaller, but the whole model only 2.03x, because this small
model's embedding and ``lm_head`` (32 % of its parameters; ~4 % in a 7 B Llama) stay in
fp32; int8-dynamic decodes 2.6x faster than compiled fp32 (3.2x than eager fp32) once
compiled with a static cache and inductor freezing, and 2x *slower* in eager mode, where
torchao dequantizes per call; the perplexity change is -0.1 %. The QuantizeJob runtime
reports eager latency (what transformers' ``generate`` runs without compilation).
A second run with the default 2 threads (891 s, heavier load: eager figures unusable)
gave compiled speedups of 2.39x (int8-dynamic), 0.98x (int8-weight-only) and 3.03x (int4);
expect tens of percent between runs on a shared machine.
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

METHOD_ORDER = ("int8-dynamic", "int8-weight-only", "int4-weight-only", "fp16", "bf16")


def _static_measurements(model: Any, windows: list[Any], tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    row = {
        "bytes": metrics.state_dict_bytes(model),
        "linearWeightBytes": metrics.linear_weight_bytes(model),
        "fullPrecisionLinearLayers": len(metrics.unquantized_linear_layers(model)),
    }
    if args.size_only:
        return row
    row["perplexity"] = metrics.perplexity(model, windows).perplexity
    if args.task:
        fmt = "chat" if '"messages"' in args.task.read_text().split("\n", 1)[0] else "prompt-completion"
        row["task"] = evaluate.evaluate(model, tokenizer, args.task, fmt, args.metric, args.task_samples)["value"]
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


def _latency_rounds(
    loaded: dict[str, Any], prompts: list[Any], args: argparse.Namespace, pad: int | None, key: str
) -> None:
    """Time all models in interleaved rounds; store the median under ``key``.

    Interleaving (every model once per round) spreads a shared machine's slow moments over
    all models instead of charging them to whichever model ran then.
    """
    runs: dict[str, list[float]] = {name: [] for name in loaded}
    for name, (model, _row) in loaded.items():
        started = time.perf_counter()
        metrics.latency(model, prompts, new_tokens=args.new_tokens, warmup=0, repeats=args.warmup, pad_token_id=pad)
        log.info("%s %s warm-up: %.1f s", name, key, time.perf_counter() - started)
    for round_ in range(args.repeats):
        for name, (model, _row) in loaded.items():
            result = metrics.latency(model, prompts, new_tokens=args.new_tokens, warmup=0, repeats=1, pad_token_id=pad)
            runs[name].append(result.ms_per_token)
        log.info("%s round %d/%d done", key, round_ + 1, args.repeats)
    for name, (_model, row) in loaded.items():
        row[key] = statistics.median(runs[name])
        row[key + "Runs"] = runs[name]


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
        texts = data.load_texts(None, 64)
        windows = data.make_windows(tokenizer, texts, args.sequence_length)
        prompts = data.latency_prompts(windows, args.prompts, args.prompt_tokens)
        pad = tokenizer.pad_token_id

        # Everything stays loaded (the small preset is 100 MB in fp32) so latency can be
        # measured in interleaved rounds.
        original = models.load_causal_lm(model_dir, device=args.device).eval()
        params = original.num_parameters()
        log.info("original: %s, %.1f M parameters, %d threads", model_dir, params / 1e6, torch.get_num_threads())
        loaded: dict[str, tuple[Any, dict[str, Any]]] = {
            "original": (original, _static_measurements(original, windows, tokenizer, args))}
        for name in args.methods:
            method = methods.get_method(name)
            try:
                method.check_supported(args.device, args.group_size)
            except methods.UnsupportedMethodError as exc:
                log.warning("%s skipped: %s", name, exc)
                continue
            model = method.load_quantized(model_dir, args.device, args.group_size, embeddings=args.embeddings)
            loaded[name] = (model, _static_measurements(model, windows, tokenizer, args))
            log.info("%s: loaded, perplexity %s", name, loaded[name][1].get("perplexity", "not measured"))

        if not args.size_only:
            _latency_rounds(loaded, prompts, args, pad, "eagerMsPerToken")
        if args.compile and not args.size_only:
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
            _latency_rounds(compiled, prompts, args, pad, "compiledMsPerToken")
        rows = {name: row for name, (_model, row) in loaded.items()}
    return {"model": f"{args.preset} preset (random weights)" if args.preset else str(model_dir), "parameters": params, "threads": torch.get_num_threads(), "rows": rows, "settings": {
        "device": args.device, "quantizeEmbeddings": args.embeddings, "sizeOnly": args.size_only,
        "groupSize": args.group_size, "prompts": args.prompts, "promptTokens": args.prompt_tokens,
        "newTokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
        "sequenceLength": args.sequence_length, "evalWindows": len(windows), "compile": args.compile,
        "task": str(args.task) if args.task else None, "metric": args.metric, "taskSamples": args.task_samples,
    }}


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = rows["original"]
    if result["settings"]["sizeOnly"]:
        lines = [f"{'method':<18} {'bytes':>11} {'of fp32':>8} {'smaller':>8} {'linear':>7}"]
        for name, row in rows.items():
            lines.append(f"{name:<18} {row['bytes']:>11,} {row['bytes'] / base['bytes']:>7.3f}x "
                         f"{base['bytes'] / row['bytes']:>7.2f}x {base['linearWeightBytes'] / row['linearWeightBytes']:>6.2f}x")
        lines.append(f"\n{result['model']}; sizes only (--size-only); int4 group size {result['settings']['groupSize']}; "
                     f"embeddings {'int8' if result['settings']['quantizeEmbeddings'] else 'full precision'}.")
        return "\n".join(lines)
    compiled = result["settings"]["compile"]
    head = f"{'method':<18} {'bytes':>11} {'smaller':>8} {'linear':>7} {'eager ms/tok':>12} {'speedup':>8}"
    if compiled:
        head += f" {'compiled ms/tok':>15} {'speedup':>8}"
    head += f" {'perplexity':>11} {'change':>9}"
    task = result["settings"]["task"]
    if task:
        head += f" {result['settings']['metric']:>10} {'change':>8}"
    lines = [head, "-" * len(head)]
    for name, row in rows.items():
        line = (
            f"{name:<18} {row['bytes']:>11,} {base['bytes'] / row['bytes']:>7.2f}x "
            f"{base['linearWeightBytes'] / row['linearWeightBytes']:>6.2f}x "
            f"{row['eagerMsPerToken']:>12.2f} {base['eagerMsPerToken'] / row['eagerMsPerToken']:>7.2f}x"
        )
        if compiled:
            c, b = row.get("compiledMsPerToken"), base.get("compiledMsPerToken")
            line += f" {c:>15.2f} {b / c:>7.2f}x" if c and b else f" {'n/a':>15} {'':>8}"
        change = (row["perplexity"] - base["perplexity"]) / base["perplexity"] * 100
        line += f" {row['perplexity']:>11.2f} {change:>+8.3f}%"
        if task:
            line += f" {row['task'] * 100:>9.1f}% {(row['task'] - base['task']) * 100:>+7.1f}pt"
        lines.append(line)
    s = result["settings"]
    lines.append(
        f"\n{result['model']}, {result['parameters'] / 1e6:.1f} M parameters, {result['threads']} threads; "
        f"device {s['device']}, embeddings {'int8' if s['quantizeEmbeddings'] else 'full precision'}; "
        f"'smaller' = whole state dict, 'linear' = decoder linear weights only; latency = greedy decode of "
        f"{s['prompts']} prompts x {s['newTokens']} new tokens, median of {s['repeats']} passes after {s['warmup']} "
        f"warm-up, interleaved; speedups against 'original'; int4 group size {s['groupSize']}."
    )
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
    parser.add_argument("--methods", nargs="+", default=list(METHOD_ORDER), choices=METHOD_ORDER)
    # 32: the small preset's down_proj is 1376 wide, which 64 and 128 do not divide (torchao
    # would leave those layers in fp32 and the int4 row would understate the compression).
    parser.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the models run (cuda: the CUDA kernels of each method, e.g. int4 tinygemm)")
    parser.add_argument("--no-quantize-embeddings", dest="embeddings", action="store_false",
                        help="keep the embedding and lm_head in full precision (the API's quantizeEmbeddings: false)")
    parser.add_argument("--size-only", action="store_true",
                        help="only the sizes (no perplexity, task or latency): seconds instead of minutes")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible here")
    # Batch-1 decoding of SmolLM2 in fp32 takes ~0.1 s per token on a 2-core CPU: 2 prompts x 16
    # tokens, median of 3 interleaved passes keeps a six-model run near two minutes of decoding.
    args.prompts, args.prompt_tokens, args.sequence_length = (1, 16, 128) if args.quick else (2, 32, 256)
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
