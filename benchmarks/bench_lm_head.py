"""The served model's vocabulary projection: ``nn.Linear`` against ``serve/lm_head.py``'s paths.

A decode step of ``rows`` requests projects ``rows`` hidden vectors onto the vocabulary
(SmolLM2-135M: 576 -> 49,152, the largest matmul of a step). This times, in one process with
the same weights and inputs, interleaved round by round:

* the baseline: ``nn.Linear``'s ``x @ W.T``;
* the engine's path (``lm_head.install``): a contiguous ``[hidden, vocab]`` copy for one row,
  ``CHUNK``-row vocabulary slices for a few rows; with ``--chunks``, other slice sizes too.

Random weights of the given shape (the time depends on the shape, not the values); the
outputs are checked equal to the baseline's. Prints the median and minimum per call and the
ratio of the medians. Usage::

    python benchmarks/bench_lm_head.py --threads 2 --rows 1,8,32 --rounds 5 --chunks 128,256,512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))


def _time(f: Callable[[], object], calls: int) -> float:
    f()
    start = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - start) / calls * 1000.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,8,32", help="rows per call (requests in a decode step)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="calls per round and variant")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunks", default="", help="also time these slice sizes (rows > 1)")
    args = parser.parse_args(argv)

    import torch

    from kubeforge_runtime.serve import lm_head

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = torch.nn.Linear(args.hidden, args.vocab, bias=False).eval()
    engine = torch.nn.Linear(args.hidden, args.vocab, bias=False).eval()
    engine.weight = base.weight

    class _Model(torch.nn.Module):
        def get_output_embeddings(self) -> torch.nn.Module:
            return engine

    if not lm_head.install(_Model()):
        print("lm_head.install did not apply", file=sys.stderr)
        return 1
    times: dict[tuple[int, str], list[float]] = {}
    rows_list = [int(r) for r in args.rows.split(",")]
    extra = [int(c) for c in args.chunks.split(",") if c]
    with torch.inference_mode():
        for _ in range(args.rounds):
            for rows in rows_list:
                x = torch.randn(1, rows, args.hidden)
                expected = base(x)
                variants: list[tuple[str, Callable[[], torch.Tensor]]] = [
                    ("nn.Linear", lambda: base(x)),
                    ("engine", lambda: engine(x)),
                ]
                if rows > 1:
                    for c in extra:
                        def sliced(c: int = c) -> torch.Tensor:
                            saved, lm_head.CHUNK = lm_head.CHUNK, c
                            try:
                                return engine(x)
                            finally:
                                lm_head.CHUNK = saved
                        variants.append((f"slices of {c}", sliced))
                for name, f in variants:
                    torch.testing.assert_close(f(), expected, rtol=1e-4, atol=1e-4)
                    times.setdefault((rows, name), []).append(_time(f, args.calls))
    print(f"lm_head {args.hidden} -> {args.vocab}, fp32, {args.threads} threads, {args.rounds} rounds x {args.calls} calls; "
          f"engine: one row against the [hidden, vocab] copy, 2-{lm_head.CHUNKED_MAX_ROWS} rows in slices of {lm_head.CHUNK}")
    print(f"{'rows':>4}  {'variant':<14} {'median ms':>9} {'min ms':>7} {'baseline/this':>13}")
    for rows in rows_list:
        baseline = statistics.median(times[(rows, "nn.Linear")])
        for (r, name), values in times.items():
            if r == rows:
                median = statistics.median(values)
                print(f"{rows:>4}  {name:<14} {median:>9.2f} {min(values):>7.2f} {baseline / median:>12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
