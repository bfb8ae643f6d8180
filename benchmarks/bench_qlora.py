"""QLoRA against LoRA on the real model: memory of the frozen base, and a short training run.

Measures, on the embedded SmolLM2-135M-Instruct (``kubeforge_runtime.embedded``):

1. **Memory of the frozen base**, summed tensor storage of the model the trainer builds for
   ``method: qlora`` (``train/model.py`` -> ``train/qlora.py``): the NF4 weights (decoder-layer
   linears, the tied embedding / ``lm_head``) against the same weights in bf16, and the whole
   frozen base (norms kept as loaded) against the whole base in bf16. The baseline is bf16 (what a LoRA base on
   a GPU is held in), computed from the same tensors' element counts.
2. **Training**: the trainer (``python -m kubeforge_runtime.train``, one process) for
   ``--steps`` steps on the sentiment starter data (prompt-completion), once with
   ``method: qlora`` and once with ``method: lora`` (the baseline), same data, seed and
   hyper-parameters; prints the training and validation losses and the seconds per step.

A benchmark, not a test: it reports numbers. Timings on a shared 2-core machine vary.

    PYTHONPATH=operator:trainer_image python benchmarks/bench_qlora.py [--steps 20] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "volumes" / "data" / "text-classification.jsonl"


def config(model: Path, out: Path, method: str, steps: int) -> dict[str, Any]:
    return {
        "kind": "FineTuneJob", "name": f"bench-{method}", "namespace": "default",
        "model": {"uri": f"file://{model}"},
        "dataset": {"uri": f"file://{DATA}", "format": "prompt-completion", "sequenceLength": 64, "packing": True,
                    "validationSplit": 0.1},
        "method": method, "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "training": {"maxSteps": steps, "globalBatchSize": 8, "microBatchSize": 8, "learningRate": 5e-4,
                     "warmupSteps": 2, "seed": 42, "precision": "fp32"},
        "checkpoint": {"intervalSteps": 0, "keepLast": 1},
        "output": {"uri": f"file://{out}", "format": "adapter"},
    }


def memory(model: Path) -> dict[str, Any]:
    from kubeforge_runtime.train import model as model_mod
    from kubeforge_runtime.train import qlora
    from kubeforge_runtime.train.config import parse_config

    cfg = parse_config(config(model, Path("/unset"), "qlora", 1))
    top, lm = model_mod.build(cfg)
    linears = [p for p in top.parameters() if qlora.is_nf4(p)]
    frozen = [p for p in top.parameters() if not p.requires_grad]
    nf4 = sum(qlora.storage_bytes(p) for p in linears)
    nf4_bf16 = sum(2 * p.numel() for p in linears)
    stored = sum(qlora.storage_bytes(p) for p in frozen)
    other = [p for p in frozen if not qlora.is_nf4(p)]
    other_bf16 = sum(2 * p.numel() for p in other)
    whole_bf16 = nf4_bf16 + other_bf16
    return {
        "quantizedLinears": len(linears), "quantizedParameters": sum(p.numel() for p in linears),
        "otherFrozenParameters": sum(p.numel() for p in other),
        "linearsNf4MB": nf4 / 1e6, "linearsBf16MB": nf4_bf16 / 1e6, "linearsRatio": nf4 / nf4_bf16,
        "baseAsTrainedMB": stored / 1e6,  # the rest in fp32, as this CPU run holds it
        "baseWithBf16RestMB": (nf4 + other_bf16) / 1e6, "baseBf16MB": whole_bf16 / 1e6,
        "baseRatio": (nf4 + other_bf16) / whole_bf16,
    }


def train(model: Path, method: str, steps: int, workdir: Path) -> dict[str, Any]:
    cfg_path = workdir / f"{method}.json"
    cfg_path.write_text(json.dumps(config(model, workdir / method, method, steps)))
    env = {**os.environ, "KUBEFORGE_METRICS_PORT": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO / "trainer_image"), os.environ.get("PYTHONPATH", "")])}
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kubeforge_runtime.train", "--config", str(cfg_path)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode:
        raise SystemExit(f"{method} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    events = [json.loads(line.split(" ", 1)[1]) for line in (proc.stdout + proc.stderr).splitlines()
              if line.startswith("KUBEFORGE_EVENT ")]
    steps_ev = [e for e in events if e["event"] == "step"]
    evals = [e for e in events if e["event"] == "eval"]
    times = [e["time"] for e in steps_ev]
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    return {"losses": [round(e["loss"], 4) for e in steps_ev], "validation": [round(e["validationLoss"], 4) for e in evals],
            "secondsPerStep": per_step, "wallSeconds": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-train", action="store_true", help="memory only")
    args = parser.parse_args(argv)
    from kubeforge_runtime import embedded

    model = embedded.ensure()
    mem = memory(model)
    print(f"model: {model.name}")
    print(f"NF4 weights (decoder linears, embedding/lm_head): {mem['quantizedLinears']} tensors, "
          f"{mem['quantizedParameters'] / 1e6:.1f} M parameters: NF4 {mem['linearsNf4MB']:.1f} MB vs bf16 "
          f"{mem['linearsBf16MB']:.1f} MB = {mem['linearsRatio']:.3f}x")
    print(f"whole frozen base ({mem['otherFrozenParameters'] / 1e6:.3f} M parameters not quantized: norms): "
          f"{mem['baseWithBf16RestMB']:.1f} MB with those in bf16 vs {mem['baseBf16MB']:.1f} MB all bf16 "
          f"= {mem['baseRatio']:.3f}x; as this fp32 CPU run holds it: {mem['baseAsTrainedMB']:.1f} MB")
    if args.skip_train:
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        results = {m: train(model, m, args.steps, Path(tmp)) for m in ("qlora", "lora")}
    for m, r in results.items():
        print(f"{m:5s}: loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} over {len(r['losses'])} steps; "
              f"validation {r['validation'][0]:.3f} -> {r['validation'][-1]:.3f}; "
              f"{r['secondsPerStep']:.2f} s/step ({r['wallSeconds']:.0f} s wall)")
    q, lo = results["qlora"], results["lora"]
    print(f"qlora/lora: final validation loss {q['validation'][-1] / lo['validation'][-1]:.3f}x, "
          f"time per step {q['secondsPerStep'] / lo['secondsPerStep']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
