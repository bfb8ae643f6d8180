"""Fused training pieces: one forward+backward of the trainer's stage, stock against fused.

The trainer's own stage (``parallelize.CausalLMStage``) on the ``small`` preset (~26 M
parameters), fp32, one micro-batch of the trainer benchmark (4 x 256 tokens of the shipped
text set, packed, logits at the target positions): the stock transformers modules and the
summed cross-entropy, against the same weights with ``train/fused.py``'s pieces swapped in
(``--pieces``: ``norm`` RMSNorm, ``rope`` RoPE, ``head`` lm_head + cross-entropy in chunks;
default all). Interleaved repeats, best of each; prints both times, the ratio and how far
the loss and gradients are apart. A benchmark, not a test.

    python benchmarks/bench_fused.py [--repeat 6] [--threads 2] [--pieces norm,rope,head] [--cpu-time]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "text.jsonl"
log = logging.getLogger("bench_fused")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pieces", default="norm,rope,head")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the process's CPU seconds, not wall seconds (steadier on a loaded machine; "
                             "use with --threads 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(REPO / "trainer_image"))
    import torch
    import torch.nn.functional as F

    from kubeforge_runtime import data, models
    from kubeforge_runtime.tiny import build_tiny_llama
    from kubeforge_runtime.train import attention, fused
    from kubeforge_runtime.train.parallelize import CausalLMStage, target_positions

    torch.set_num_threads(args.threads)
    pieces = set(args.pieces.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-fused-") as tmp:
        model_dir = build_tiny_llama(Path(tmp) / "model", preset="small", seed=0)
        tok = models.load_tokenizer(str(model_dir))
        prepared = data.prepare(tok, DATA, "text", args.seq_len, True, validation_split=0.0, seed=0)
        lms = [models.load_causal_lm(model_dir).train() for _ in range(2)]
    for lm in lms:
        lm.config.use_cache = False
        attention.apply(lm, attention.resolve("auto", "cpu"))
    if pieces & {"norm", "rope"}:
        swapped = fused.apply(lms[1])
        if "norm" not in pieces:  # keep only the requested swaps
            for m in lms[1].modules():
                if "forward" in m.__dict__ and type(m).__name__.endswith("RMSNorm"):
                    del m.forward
        if "rope" not in pieces:
            for m in lms[1].modules():
                if "forward" in m.__dict__ and type(m).__name__.endswith("Attention"):
                    del m.forward
        log.info("swapped: %s", swapped)
    stages = [CausalLMStage(lm, True, True) for lm in lms]
    n = args.micro_batch
    x, y, pos = prepared.train_inputs[:n], prepared.train_labels[:n], prepared.train_positions[:n]
    at = target_positions(y, "cpu")
    ya = y.flatten().index_select(0, at)

    clock = time.process_time if args.cpu_time else time.perf_counter

    def run(i: int) -> tuple[float, float]:
        began = clock()
        if i == 1 and "head" in pieces:
            loss = stages[i](x, pos, at, ya)
        else:
            loss = F.cross_entropy(stages[i](x, pos, at), ya, ignore_index=data.IGNORE_INDEX, reduction="sum")
        loss.backward()
        return clock() - began, float(loss.detach())

    losses = [run(0)[1], run(1)[1]]  # warm-up; gradients of the first pass kept for the comparison
    grads = [{k: p.grad.clone() for k, p in lm.named_parameters()} for lm in lms]
    worst = max(float((grads[0][k] - grads[1][k]).abs().max() / grads[0][k].abs().max().clamp_min(1e-30))
                for k in grads[0])
    times: dict[str, list[float]] = {"stock": [], "fused": []}
    for rep in range(args.repeat):
        for i, name in enumerate(times):
            for lm in lms:
                lm.zero_grad(set_to_none=True)
            times[name].append(run(i)[0])
        log.info("repeat %d: stock %.3f s, fused %.3f s", rep + 1, times["stock"][-1], times["fused"][-1])
    best = {k: min(v) for k, v in times.items()}
    log.info("pieces %s, %d threads, micro-batch %d x %d, %s", ",".join(sorted(pieces)), args.threads, n,
             args.seq_len, "CPU seconds" if args.cpu_time else "wall seconds")
    log.info("stock: best %.3f s   fused: best %.3f s   stock/fused %.3fx", best["stock"], best["fused"],
             best["stock"] / best["fused"])
    log.info("loss stock %.6f fused %.6f; worst gradient difference %.2e (relative to the tensor's max)",
             losses[0], losses[1], worst)
    sys.stdout.write(json.dumps({"pieces": sorted(pieces), "stockSeconds": round(best["stock"], 4),
                                 "fusedSeconds": round(best["fused"], 4),
                                 "speedup": round(best["stock"] / best["fused"], 3),
                                 "lossStock": losses[0], "lossFused": losses[1],
                                 "worstGradRelDiff": worst}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
