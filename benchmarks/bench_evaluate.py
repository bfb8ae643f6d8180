"""Benchmark: the evaluator's batched generation with finished rows leaving the batch, against one stage.

``kubeforge_runtime.evaluate.generate`` decodes a batch in stages of ``STAGE_TOKENS``; between
stages the rows whose answers are complete (EOS, or :func:`answer_end` for the metric) leave
the batch with their KV-cache rows. ``one-stage`` is the previous behaviour (transformers'
``generate`` once, to the token cap: a finished row stays in the batch, padded, until every
row is done or the cap is hit); ``staged`` is the default. Both run the same records on the
same model in one process, interleaved, ``--repeats`` times; the figure to read is the ratio
of their medians, beside the row-steps (rows x forward passes) each decoded, which do not
depend on the machine's load. The predictions of the two must be equal (checked).

Default: the code-generation starter's base-model evaluation as the local flow test runs it
(the embedded SmolLM2-135M-Instruct, the first 30 records of
examples/volumes/data/code-generation-test.jsonl, passAtOne, one batch of 32).

    python benchmarks/bench_evaluate.py [--model DIR] [--data FILE] [--metric M] [--samples N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))

from kubeforge_runtime import evaluate  # noqa: E402


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default=str(REPO / "examples/volumes/data/code-generation-test.jsonl"))
    parser.add_argument("--format", default="prompt-completion")
    parser.add_argument("--metric", default="passAtOne")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32, help="the evaluator's default")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from kubeforge_runtime.models import load_causal_lm, load_tokenizer

    if args.model is None:
        from kubeforge_runtime import embedded
        args.model = str(embedded.ensure())
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype=torch.float32)
    examples = evaluate.load_examples(args.data, args.format, tokenizer, args.samples, metric=args.metric)
    prompts = [e.prompt for e in examples]
    cap = evaluate.max_new_tokens_for(tokenizer, examples, args.metric)
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    print(f"model {args.model}\n{len(prompts)} records of {args.data}, metric {args.metric}, cap {cap} new tokens, "
          f"batch {args.batch_size}, stage {evaluate.STAGE_TOKENS} tokens, torch threads {torch.get_num_threads()}")

    cases = {"one-stage": 1 << 30, "staged": evaluate.STAGE_TOKENS}
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    steps: dict[str, int] = {}
    answers: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, stage in cases.items():
            rows.clear()
            c0, t0 = _cpu(), time.perf_counter()
            answers[name] = evaluate.generate(model, tokenizer, prompts, cap, args.batch_size, metric=args.metric,
                                              stage_tokens=stage)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(_cpu() - c0)
            steps[name] = sum(rows)
    same = sum(a == b for a, b in zip(answers["one-stage"], answers["staged"]))
    for name in cases:
        print(f"{name:10s} {statistics.median(wall[name]):8.1f} s wall  {statistics.median(cpu[name]):8.1f} s CPU  "
              f"{steps[name]:6d} row-steps   (runs: {', '.join(f'{w:.1f}' for w in wall[name])})")
    print(f"staged / one-stage: wall {statistics.median(wall['staged']) / statistics.median(wall['one-stage']):.2f}x, "
          f"CPU {statistics.median(cpu['staged']) / statistics.median(cpu['one-stage']):.2f}x, "
          f"row-steps {steps['staged'] / steps['one-stage']:.2f}x; equal predictions {same}/{len(prompts)}")
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
