"""Peak memory per rank of sharded loading (``train/loading.py``) against a one-process load.

The model: a random Llama-style model of ~1.03 B parameters (hidden 2048, 20 layers, 32
heads / 8 KV heads, FFN 5632, vocabulary 32000, untied head), stored in bf16 as sharded
safetensors (``model-0000N-of-0000M.safetensors`` + index, 500 MB shards), built once under
``~/.cache/kubeforge/bench-load-1b`` with the tiny tokenizer.

Baseline (same run): one process loading the model as every rank did before sharded
loading (``AutoModelForCausalLM.from_pretrained(dir, dtype=float32)``, ``train/model.py``'s
``load_base``): its peak resident set (``VmHWM``).

Measured: the runtime's own train command (``torchrun ... -m kubeforge_runtime.train``, as
a pod runs it), LoRA r=16 on q/k/v/o with precision bf16 (the frozen base stays bf16, the
adapters fp32; autocast, or fp32 compute from the bf16 weights on a CPU without native bf16:
``train/precision.py``), sequence 64, one optimizer step, under
FSDP DP=4, TP=2 x DP=2 and PP=2 x DP=2 (GPipe, two micro-batches per data-parallel rank);
every worker's ``VmHWM`` when the last step is reported (so the load and the training steps
are in it; the final checkpoint and output are not), the largest worker reported, and the
same when training starts (after loading: the load phase alone). The fixed overhead is the
same layout's peak on a ~0.1 M-parameter model
(Python, torch, transformers, peft, gloo, the data): what a rank holds whatever the model.

One torch thread per rank (the machine has 2 cores); the timing column is slowed by
whatever else runs on the machine. A benchmark, not a test: it reports, it asserts nothing.

    python benchmarks/bench_load.py [--only fsdp-dp4,tp2-dp2,pp2-dp2] [--json OUT.json]
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
sys.path.insert(0, str(REPO / "trainer_image"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_fit import BASE, _vm_hwm, _workers, train_command  # noqa: E402  (same launch and RSS reading)

BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=32,
           num_key_value_heads=8, vocab_size=32000)
CACHE = Path(os.environ.get("KUBEFORGE_CACHE", Path.home() / ".cache" / "kubeforge")) / "bench-load-1b"
DATA = REPO / "examples" / "data" / "text.jsonl"

LAYOUTS: dict[str, tuple[int, dict[str, Any], int]] = {
    "fsdp-dp4": (4, {}, 64),
    "tp2-dp2": (4, {"tensor": 2}, 64),
    # Sequence 64 like the others again: one step under bf16 autocast took over 37 minutes
    # here (torch's fallback bf16 GEMM in backward, train/precision.py); on a CPU without
    # native bf16 the trainer now computes bf16 runs in fp32 from the bf16 weights.
    "pp2-dp2": (4, {"pipeline": 2, "pipelineSchedule": "GPipe"}, 64),
}
"""name -> (processes, parallelism, sequence length)."""


def build_model(out: Path, shape: dict[str, int], shard: str = "500MB") -> Path:
    """A random-weight bf16 Llama saved as sharded safetensors, built once (weights drawn
    N(0, 0.02) straight into bf16: no fp32 copy of the whole model is ever made)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubeforge_runtime.tiny import build_tokenizer

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    tok = build_tokenizer(tmp, vocab_size=min(2048, shape["vocab_size"]))
    cfg = LlamaConfig(**shape, max_position_embeddings=1024, tie_word_embeddings=False, dtype="bfloat16",
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("meta"):
        lm = LlamaForCausalLM(cfg).to(torch.bfloat16)
    lm.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    lm.save_pretrained(str(tmp), max_shard_size=shard)
    tmp.rename(out)
    return out


def one_process_load(model: Path, threads: int) -> tuple[int, float]:
    """Peak RSS (bytes) and seconds of one process loading the whole model in fp32 (the old way)."""
    code = ("import sys, time, torch; from transformers import AutoModelForCausalLM; t = time.time(); "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); "
            "print(time.time() - t); import os; print(open(f'/proc/{os.getpid()}/status').read())")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code, str(model)], env=env, capture_output=True, text=True,
                         check=True).stdout
    seconds = float(out.splitlines()[0])
    hwm = next(int(line.split()[1]) * 1024 for line in out.splitlines() if line.startswith("VmHWM:"))
    return hwm, seconds


def _rank_of(pid: int) -> int | None:
    """The torch.distributed rank of a trainer process (its ``RANK`` environment variable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        return int(env[b"RANK"])
    except (OSError, KeyError, ValueError):
        return None


def measure(spec: dict[str, Any], nproc: int, workdir: Path, threads: int) -> tuple[int, int, float, dict[int, int]]:
    """(peak RSS of the largest worker when training starts - the load phase -, the same at
    the last training step - load and training -, seconds, each rank's peak at the last
    step): the runtime's train command under torchrun, killed after its last step (the
    output phase is not measured)."""
    import signal
    import threading

    cmd, env = train_command(spec, nproc, workdir, threads)
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    load = train = None
    per_rank: dict[int, int] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("KUBEFORGE_EVENT "):
                continue
            event = json.loads(line.split(" ", 1)[1])
            peak = max((v for v in (_vm_hwm(p) for p in _workers(proc.pid)) if v), default=None)
            if event.get("event") == "start":
                load = peak
            if event.get("event") == "step" and event.get("step") == spec["training"]["maxSteps"]:
                train = peak
                per_rank = {r: v for r, v in ((_rank_of(p), _vm_hwm(p)) for p in _workers(proc.pid))
                            if r is not None and v}
                break
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    if load is None or train is None:
        raise RuntimeError("trainer ended before its last step:\n" + "".join(errors[-40:]))
    return load, train, time.time() - started, per_rank


def spec_for(model: Path, out: Path, parallelism: dict[str, Any], sequence: int = 64) -> dict[str, Any]:
    return {
        "kind": "FineTuneJob", "name": "bench-load", "namespace": "default", "model": {"uri": f"file://{model}"},
        "dataset": {"uri": f"file://{DATA}", "format": "text", "sequenceLength": sequence, "packing": True,
                    "validationSplit": 0.0},
        "method": "lora", "lora": {"r": 16, "alpha": 32, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "parallelism": {"strategy": "fsdp", "tensor": 1, "pipeline": 1, **parallelism},
        "training": {"maxSteps": 1, "globalBatchSize": 4, "microBatchSize": 1, "seed": 0, "precision": "bf16",
                     "learningRate": 1e-4},
        "checkpoint": {"intervalSteps": 0, "keepLast": 1},
        "output": {"uri": f"file://{out}", "format": "adapter"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated layout names")
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(LAYOUTS)
    started = time.time()
    big = build_model(CACHE, BIG)
    print(f"model {big} built/found in {time.time() - started:.0f} s", flush=True)
    from kubeforge_runtime import fit

    arch = fit.Architecture.from_hf_config(json.loads((big / "config.json").read_text()))
    fp32_size = 4 * arch.total_params
    root = Path(tempfile.mkdtemp(prefix="bench-load-"))
    small = build_model(root / "small", BASE)
    base_peak, base_s = one_process_load(big, args.threads)
    print(f"parameters {arch.total_params / 1e9:.3f} B; fp32 size {fp32_size / 2**30:.2f} GiB; "
          f"one-process fp32 load: peak {base_peak / 2**30:.2f} GiB in {base_s:.0f} s", flush=True)
    rows = []
    for name in names:
        nproc, par, seq = LAYOUTS[name]
        work = root / name
        work.mkdir()
        load, peak, seconds, per_rank = measure(spec_for(big, work / "out", par, seq), nproc, work, args.threads)
        (work / "small").mkdir()
        _, overhead, _, _ = measure(spec_for(small, work / "small" / "out", par, seq), nproc, work / "small",
                                    args.threads)
        rows.append({"name": name, "sequence": seq, "loadPeak": load, "peak": peak, "overhead": overhead,
                     "seconds": seconds, "peakByRank": per_rank})
        print(f"{name:<9} per rank: load {load / 2**30:.2f} GiB = {load / base_peak:.2f}x, load + 1 step "
              f"{peak / 2**30:.2f} GiB = {peak / base_peak:.2f}x the one-process load; fixed overhead "
              f"{overhead / 2**30:.2f} GiB; above it: load {(load - overhead) / fp32_size:.3f}x, training "
              f"{(peak - overhead) / fp32_size:.3f}x the fp32 model (sequence {seq}; {seconds:.0f} s)", flush=True)
        print(f"{'':<9} each rank at its last step: " + ", ".join(
            f"rank {r} {v / 2**30:.2f} GiB" for r, v in sorted(per_rank.items())), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"parameters": arch.total_params, "fp32Bytes": fp32_size,
                                               "oneProcessLoadPeak": base_peak, "layouts": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
