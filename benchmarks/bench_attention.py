"""Packed-mask overhead: a training forward+backward on packed samples against plain causal.

The trainer's own stage forward (``parallelize.CausalLMStage``) on the ``small`` preset
(~26 M parameters), fp32, micro-batch 4 of the shipped text set packed to ``--seq-len``:
once with the samples' real position ids (records restart inside a sample: document-causal
attention, whatever the attention implementation makes of it, ``train/attention.py``) and
once with plain positions 0..S-1 (one causal sequence per row, SDPA's fast path). Same
tokens, same weights; the two are interleaved, ``--repeat`` times each, and the best time of
each is compared (on a shared machine the best run is the least disturbed one). Prints both
times and the overhead; a benchmark, not a test.

    python benchmarks/bench_attention.py [--attention sdpa] [--seq-len 256] [--repeat 8] [--compile]
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
log = logging.getLogger("bench_attention")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", default="sdpa", help="attention implementation (train/attention.py)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="compile each decoder block (training.compile)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(REPO / "trainer_image"))
    import torch
    import torch.nn.functional as F

    from kubeforge_runtime import data, models
    from kubeforge_runtime.tiny import build_tiny_llama
    from kubeforge_runtime.train import attention
    from kubeforge_runtime.train.parallelize import CausalLMStage

    with tempfile.TemporaryDirectory(prefix="bench-attention-") as tmp:
        model_dir = build_tiny_llama(Path(tmp) / "model", preset="small", seed=0)
        tok = models.load_tokenizer(str(model_dir))
        prepared = data.prepare(tok, DATA, "text", args.seq_len, True, validation_split=0.0, seed=0)
        lm = models.load_causal_lm(model_dir).to(args.device).train()
    lm.config.use_cache = False
    attention.apply(lm, attention.resolve(args.attention, args.device))
    if args.compile:
        from kubeforge_runtime.train import compiled

        compiled.compile_blocks(lm)
    stage = CausalLMStage(lm, True, True)
    n = args.micro_batch
    x = prepared.train_inputs[:n].to(args.device)
    y = prepared.train_labels[:n].to(args.device)
    packed = prepared.train_positions[:n].to(args.device)
    plain = torch.arange(args.seq_len, device=args.device).repeat(n, 1)
    records = int((packed == 0).sum())

    def step(pos: torch.Tensor) -> float:
        began = time.perf_counter()
        logits = stage(x, pos)
        F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=data.IGNORE_INDEX).backward()
        lm.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    for pos in (plain, packed, plain, packed):  # warm-up (and compilation)
        step(pos)
    times: dict[str, list[float]] = {"plain": [], "packed": []}
    for i in range(args.repeat):
        times["plain"].append(step(plain))
        times["packed"].append(step(packed))
        log.info("repeat %d: plain %.3f s, packed %.3f s", i + 1, times["plain"][-1], times["packed"][-1])
    best = {k: min(v) for k, v in times.items()}
    overhead = best["packed"] / best["plain"] - 1
    log.info("attention %s%s, micro-batch %d x %d tokens, %d records packed in it", lm.config._attn_implementation,
             " (compiled blocks)" if args.compile else "", n, args.seq_len, records)
    log.info("plain causal:   best %.3f s  (all: %s)", best["plain"], " ".join(f"{t:.3f}" for t in times["plain"]))
    log.info("packed records: best %.3f s  (all: %s)", best["packed"], " ".join(f"{t:.3f}" for t in times["packed"]))
    log.info("packed-mask overhead: %+.1f %%", 100 * overhead)
    sys.stdout.write(json.dumps({"attention": lm.config._attn_implementation, "compile": args.compile,
                                 "seqLen": args.seq_len, "microBatch": n, "records": records,
                                 "plainSeconds": round(best["plain"], 4), "packedSeconds": round(best["packed"], 4),
                                 "overhead": round(overhead, 4)}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
