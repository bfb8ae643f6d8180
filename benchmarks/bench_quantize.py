"""Benchmark: every quantization method side by side with the original model, in one run.

For the ``small`` preset (Llama-style, ~26 M parameters, random weights) built on the fly,
this loads the original once and each method's quantized model through the same code the
QuantizeJob runtime uses (``kubeforge_runtime.quantize.methods``), and measures, with the
runtime's own functions (``kubeforge_runtime.quantize.metrics``):

* size: state-dict payload bytes of the whole model, and of the decoder's linear weights
  alone (what quantization targets; the embedding and ``lm_head`` stay in full precision);
* per-token latency: greedy decoding of the same prompts, warm-up excluded, median of
  repeated passes; ``--compile`` also times each model after ``torch.compile``;
* perplexity on the built-in evaluation text, and its change in percent.

The original is measured first and again last, so drift of a shared machine is visible
(timings here vary by tens of percent between runs; compare within one run).

Run::

    python benchmarks/bench_quantize.py            # all methods, eager
    python benchmarks/bench_quantize.py --quick    # fewer repeats/tokens (CI)
    python benchmarks/bench_quantize.py --compile  # eager and torch.compile'd decode

Random weights make perplexity ~ vocabulary size and say nothing about task quality; what
the column shows is how far each method moves the model's predictions.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))

from kubeforge_runtime import models, tiny  # noqa: E402
from kubeforge_runtime.quantize import data, methods, metrics  # noqa: E402

log = logging.getLogger("bench_quantize")

METHOD_ORDER = ("int8-dynamic", "int8-weight-only", "int4-weight-only", "fp16", "bf16")


def _measure(model: Any, windows: list[Any], prompts: list[Any], args: argparse.Namespace, pad: int | None) -> dict[str, Any]:
    import torch

    row: dict[str, Any] = {
        "bytes": metrics.state_dict_bytes(model),
        "linearWeightBytes": metrics.linear_weight_bytes(model),
        "perplexity": metrics.perplexity(model, windows).perplexity,
    }
    kwargs = dict(new_tokens=args.new_tokens, warmup=args.warmup, repeats=args.repeats, pad_token_id=pad)
    row["eagerMsPerToken"] = metrics.latency(model, prompts, **kwargs).ms_per_token
    if args.compile:
        # Compile the forward only; generate() stays Python. dynamic=True: the sequence
        # grows by one each step, and one graph for all lengths keeps compile time bounded.
        eager_forward = model.forward
        started = time.perf_counter()
        model.forward = torch.compile(eager_forward, dynamic=True)
        try:
            metrics.latency(model, prompts[:1], new_tokens=args.new_tokens, warmup=0, repeats=1, pad_token_id=pad)
            row["compileSeconds"] = time.perf_counter() - started
            row["compiledMsPerToken"] = metrics.latency(model, prompts, **kwargs).ms_per_token
        except Exception as exc:  # a method torch.compile cannot handle is reported, not fatal
            log.warning("torch.compile failed: %s", str(exc).splitlines()[0])
            row["compiledMsPerToken"] = None
        finally:
            model.forward = eager_forward
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        model_dir = tiny.build_tiny_llama(Path(tmp) / "model", preset=args.preset, seed=0)
        tokenizer = models.load_tokenizer(model_dir)
        texts = data.load_texts(None, 64)
        windows = data.make_windows(tokenizer, texts, args.sequence_length)
        prompts = data.latency_prompts(windows, args.prompts, args.prompt_tokens)
        pad = tokenizer.pad_token_id

        original = models.load_causal_lm(model_dir).eval()
        params = original.num_parameters()
        log.info("original: %s preset, %.1f M parameters, %d threads", args.preset, params / 1e6, torch.get_num_threads())
        rows: dict[str, dict[str, Any]] = {"original": _measure(original, windows, prompts, args, pad)}
        del original
        gc.collect()

        for name in args.methods:
            method = methods.get_method(name)
            try:
                method.check_supported("cpu", args.group_size)
            except methods.UnsupportedMethodError as exc:
                log.warning("%s skipped: %s", name, exc)
                continue
            log.info("measuring %s", name)
            model = method.load_quantized(model_dir, "cpu", args.group_size)
            rows[name] = _measure(model, windows, prompts, args, pad)
            del model
            gc.collect()

        original = models.load_causal_lm(model_dir).eval()
        rows["original (again)"] = _measure(original, windows, prompts, args, pad)
    return {"preset": args.preset, "parameters": params, "threads": torch.get_num_threads(), "rows": rows, "settings": {
        "groupSize": args.group_size, "prompts": args.prompts, "promptTokens": args.prompt_tokens,
        "newTokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
        "sequenceLength": args.sequence_length, "evalWindows": len(windows), "compile": args.compile,
    }}


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = rows["original"]
    compiled = result["settings"]["compile"]
    head = f"{'method':<18} {'bytes':>11} {'smaller':>8} {'linear':>7} {'eager ms/tok':>12} {'speedup':>8}"
    if compiled:
        head += f" {'compiled ms/tok':>15} {'speedup':>8}"
    head += f" {'perplexity':>11} {'change':>9}"
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
        lines.append(line)
    s = result["settings"]
    lines.append(
        f"\n{result['preset']} preset, {result['parameters'] / 1e6:.1f} M parameters, {result['threads']} threads; "
        f"'smaller' = whole state dict, 'linear' = decoder linear weights only; latency = greedy decode of "
        f"{s['prompts']} prompts x {s['newTokens']} new tokens, median of {s['repeats']} passes after {s['warmup']} "
        f"warm-up; speedups against the first 'original' row; int4 group size {s['groupSize']}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts, tokens and repeats")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd decoding")
    parser.add_argument("--preset", default="small", choices=sorted(tiny.PRESETS))
    parser.add_argument("--methods", nargs="+", default=list(METHOD_ORDER), choices=METHOD_ORDER)
    # 32: the small preset's down_proj is 1376 wide, which 64 and 128 do not divide (torchao
    # would leave those layers in fp32 and the int4 row would understate the compression).
    parser.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128))
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    args.prompts, args.prompt_tokens, args.sequence_length = (2, 16, 128) if args.quick else (4, 32, 256)
    args.new_tokens, args.warmup, args.repeats = (8, 1, 3) if args.quick else (32, 1, 5)
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
