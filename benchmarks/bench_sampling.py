"""Benchmark: the continuous engine's per-step sampling, transformers' warpers and draw against the row-wise ones.

One decoding step's sampling as the continuous engine runs it (per-request temperature, top-k
and top-p warpers, then one token per row), on random logits over a vocabulary of
``--vocab`` tokens (default SmolLM2's 49,152), for ``--batches`` rows and three request mixes:

* ``greedy`` - every row greedy (``top_k=1``: what ``temperature: 0`` becomes);
* ``sampled`` - every row temperature 0.7, no top-k, no top-p;
* ``mixed`` - a quarter each of greedy, top-k 40, top-p 0.9 and plain temperature rows.

``stock`` is transformers' path (a full sort per row for top-k and again for top-p, then
``softmax`` + ``multinomial``); ``rowwise`` is ``kubeforge_runtime.serve.sampling``. Both run
in the same process, interleaved, median of ``--repeats``; the ratio is the figure to read.

    python benchmarks/bench_sampling.py --batches 1,32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))

import torch  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402
from transformers.generation.continuous_batching.cb_logits_processors import (  # noqa: E402
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import (  # noqa: E402
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kubeforge_runtime.serve import sampling  # noqa: E402

NO_TOP_K = 1 << 30


def _processors() -> ContinuousBatchingLogitsProcessorList:
    warpers = [TemperatureLogitsWarper(0.5), TopKLogitsWarper(NO_TOP_K), TopPLogitsWarper(0.5)]
    return ContinuousBatchingLogitsProcessorList(LogitsProcessorList(warpers), per_request_processors=True)


def _args(mix: str, rows: int) -> torch.Tensor:
    temperature, top_k, top_p = torch.ones(rows), torch.full((rows,), NO_TOP_K, dtype=torch.int32), torch.ones(rows)
    for i in range(rows):
        kind = {"greedy": 0, "sampled": 3}.get(mix, i % 4)
        if kind == 0:
            top_k[i] = 1
        elif kind == 1:
            temperature[i], top_k[i] = 0.7, 40
        elif kind == 2:
            temperature[i], top_p[i] = 0.7, 0.9
        else:
            temperature[i] = 0.7
    args = torch.zeros(3, rows, dtype=torch.int32)
    args[0], args[1], args[2] = temperature.view(torch.int32), top_k, top_p.view(torch.int32)
    return args


def _stock_step(processors: ContinuousBatchingLogitsProcessorList, ids: torch.Tensor, logits: torch.Tensor,
                args: torch.Tensor) -> torch.Tensor:
    scores = processors(ids, logits, args)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(-1)


def _rowwise_step(processors: ContinuousBatchingLogitsProcessorList, ids: torch.Tensor, logits: torch.Tensor,
                  args: torch.Tensor) -> torch.Tensor:
    return sampling.sample_rows(torch.softmax(processors(ids, logits, args), dim=-1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--mixes", default="greedy,sampled,mixed")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stock = _processors()

    class _Holder:
        logit_processor = _processors()

    sampling.install(_Holder)
    rowwise = _Holder.logit_processor
    print(f"bench_sampling: vocab {args.vocab}, {args.threads} threads, median of {args.repeats} steps, ms per step")
    print(f"{'rows':>5} {'mix':<8} {'stock':>9} {'rowwise':>9} {'ratio':>7}")
    with torch.inference_mode():
        for rows in (int(b) for b in args.batches.split(",")):
            for mix in args.mixes.split(","):
                logits = torch.randn(rows, args.vocab, generator=torch.Generator().manual_seed(rows)) * 3
                ids, targs = torch.zeros(rows, dtype=torch.long), _args(mix, rows)
                times: dict[str, list[float]] = {"stock": [], "rowwise": []}
                for _ in range(args.repeats + 1):  # the first round warms up and is dropped
                    for name, step, procs in (("stock", _stock_step, stock), ("rowwise", _rowwise_step, rowwise)):
                        start = time.perf_counter()
                        step(procs, ids, logits, targs)
                        times[name].append(time.perf_counter() - start)
                a, b = (statistics.median(times[n][1:]) * 1e3 for n in ("stock", "rowwise"))
                print(f"{rows:>5} {mix:<8} {a:>9.2f} {b:>9.2f} {a / b:>6.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
