"""The int8 ``lm_head`` of SmolLM2-135M per call: fp32 against torchao 0.18's weight-only linear
and the runtime's blockwise one (``kubeforge_runtime/quantize/int8_linear.py``).

A ``Linear(576, 49152)`` (SmolLM2-135M's tied ``lm_head``) with random weights (timing does
not depend on the values), quantized with the runtime's embedding config (int8, one scale per
32 values of a row) and with one scale per row; called at batch 1 (a decode step) and with 64
rows (a 64-token prefill). Every path runs in each of ``--rounds`` interleaved rounds of
``--calls`` calls; the figure is the median round's ms per call. torchao's path is its own
function, read from its dispatch table before the runtime registers the blockwise one.

    flock /tmp/kf-bench.lock python benchmarks/bench_int8_lm_head.py --calls 10 --rounds 5

Prints the max |difference| of each int8 path from the dequantize-then-multiply reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10, help="calls per path per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, PerGroup, PerRow, quantize_

    torchao_linear = Int8Tensor._TORCH_FN_TABLE[Int8Tensor][F.linear]  # before the runtime's

    from kubeforge_runtime.quantize import embeddings, int8_linear

    embeddings.register_ops()
    torch.manual_seed(0)
    fp32 = torch.nn.Linear(args.hidden, args.vocab, bias=False).eval()
    weights: dict[str, Any] = {}
    for name, granularity in (("group 32", PerGroup(embeddings.GROUP_SIZE)), ("row", PerRow())):
        layer = torch.nn.Linear(args.hidden, args.vocab, bias=False)
        layer.weight.data.copy_(fp32.weight.data)
        quantize_(layer, Int8WeightOnlyConfig(granularity=granularity))
        weights[name] = layer.weight

    def paths(x: Any) -> dict[str, Callable[[], Any]]:
        return {
            "fp32": lambda: fp32(x),
            "int8 group 32, torchao 0.18": lambda: torchao_linear(F.linear, (), (x, weights["group 32"], None), {}),
            "int8 group 32, blockwise (runtime)": lambda: F.linear(x, weights["group 32"]),
            "int8 per row, torchao 0.18": lambda: torchao_linear(F.linear, (), (x, weights["row"], None), {}),
            "int8 per row, blockwise (runtime)": lambda: F.linear(x, weights["row"]),
        }

    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "calls": args.calls, "rounds": args.rounds, "rows": {}}
    started = time.perf_counter()
    for batch in (1, 64):
        x = torch.randn(batch, args.hidden)
        times: dict[str, list[float]] = {}
        with torch.inference_mode():
            fns = paths(x)
            errors = {}
            for name, fn in fns.items():
                fn()  # warm-up
                if name.startswith("int8"):
                    weight = weights["group 32" if "group" in name else "row"]
                    errors[name] = float((fn() - x @ weight.dequantize().t()).abs().max())
                    assert int8_linear.handles(x, weight)
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    times.setdefault(name, []).append((time.perf_counter() - start) * 1e3 / args.calls)
        base = statistics.median(times["fp32"])
        print(f"\nbatch {batch} (Linear({args.hidden}, {args.vocab}); median of {args.rounds} rounds "
              f"of {args.calls} calls)")
        print(f"| path | ms per call | vs fp32 | max abs diff from dequantize-then-matmul |")
        print("|---|---|---|---|")
        for name, samples in times.items():
            ms = statistics.median(samples)
            err = f"{errors[name]:.1e}" if name in errors else "-"
            print(f"| {name} | {ms:.1f} | {base / ms:.2f}x | {err} |")
            results["rows"].setdefault(str(batch), {})[name] = {"ms": ms, "samples": samples,
                                                                 "maxAbsDiff": errors.get(name)}
    results["seconds"] = time.perf_counter() - started
    print(f"\n{results['seconds']:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
