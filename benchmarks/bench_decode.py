"""Benchmark: decode latency of a model and its quantized variants through the server's engine.

What a QuantizeJob reports and an InferenceService serves, side by side in one run: for each
``engine.compile`` setting and each method, the model is served by the engine the server
would build (``kubeforge_runtime.quantize.metrics.served_latency``: backend ``auto``, the
``serve.decode`` plan, warmed up and compiled before timing) and timed at batch 1 and batch 8
(ms per generated token as one client sees it, median of passes). Each method's figure is
printed next to the original model's under the same compile setting, with the ratio.

Run::

    python benchmarks/bench_decode.py                                  # SmolLM2-135M-Instruct
    python benchmarks/bench_decode.py --methods int8-weight-only --compile off,on
    python benchmarks/bench_decode.py --model small --quick            # random preset (CI)

Timings on a shared 2-core machine vary by tens of percent between runs: read the ratios
within one run.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))

log = logging.getLogger("bench_decode")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory, 'small' for the random preset (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--methods", default="int8-weight-only", help="comma-separated QuantizeJob methods")
    parser.add_argument("--compile", default="off,on", help="engine.compile settings to compare (auto, on, off)")
    parser.add_argument("--batches", default="1,8", help="concurrent requests per pass")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 tokens, 1 repeat")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.new_tokens, args.repeats = 8, 1

    import tempfile

    import torch

    from kubeforge_runtime import models
    from kubeforge_runtime.quantize import data, metrics
    from kubeforge_runtime.quantize.methods import get_method

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_serve import load_model_dir  # the same model resolution as the serving benchmark

    batches = [int(b) for b in args.batches.split(",")]
    settings = [s for s in args.compile.split(",") if s]
    methods = ["original", *[m for m in args.methods.split(",") if m]]
    rows: dict[tuple[str, str], metrics.ServedLatency] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        model_dir = load_model_dir(args.model, Path(tmp))
        tokenizer = models.load_tokenizer(str(model_dir))
        texts = data.load_texts(None, 8)
        windows = data.make_windows(tokenizer, texts, args.prompt_tokens)
        prompts = data.latency_prompts(windows, 1, args.prompt_tokens)
        for method in methods:
            for setting in settings:
                model: Any
                if method == "original":
                    model = models.load_causal_lm(str(model_dir), device="cpu").eval()
                else:
                    model = get_method(method).load_quantized(model_dir, "cpu", 32).eval()
                log.info("%s, engine.compile %s", method, setting)
                rows[(method, setting)] = metrics.served_latency(
                    model, tokenizer, prompts, compile=setting, batch_sizes=batches,
                    new_tokens=args.new_tokens, repeats=args.repeats)
                del model
                gc.collect()
    print(f"\nbench_decode: {model_dir}, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}, {time.monotonic() - started:.0f} s; "
          "shared machine: read the ratios within this run")
    header = f"{'method':<18} {'engine.compile':<15} {'path':<52}" + "".join(
        f" {'b' + str(b) + ' ms/tok':>11} {'vs orig':>8}" for b in batches)
    print(header)
    for (method, setting), served in rows.items():
        base = rows[("original", setting)]
        cells = ""
        for b in batches:
            ms = served.batches[b].ms_per_token
            cells += f" {ms:11.1f} {base.batches[b].ms_per_token / ms:7.2f}x"
        print(f"{method:<18} {setting:<15} {served.path:<52}{cells}")
    for setting in settings[1:]:
        for method in methods:
            ratio = [rows[(method, settings[0])].batches[b].ms_per_token / rows[(method, setting)].batches[b].ms_per_token
                     for b in batches]
            print(f"{method}: engine.compile {setting} vs {settings[0]}: "
                  + ", ".join(f"b{b} {r:.2f}x faster" for b, r in zip(batches, ratio)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
