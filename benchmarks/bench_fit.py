"""The fit check's memory estimate against the measured peak of real training runs.

For each configuration it runs the runtime's own train command (``python -m
torch.distributed.run ... -m kubeforge_runtime.train --config ...``, exactly as a pod does)
on a random Llama-style model big enough that the training state dominates the process
(~43 M parameters: hidden 512, 12 layers, 8 heads / 4 KV heads, FFN 1376, vocabulary
8192, fp32 master weights), reads every worker's peak resident set (``VmHWM`` in
``/proc/PID/status``) when the last training step is reported, and subtracts the same
layout's peak on a ~0.1 M-parameter model of the same run (the process baseline: Python,
torch, gloo, DeepSpeed's imports, the data). It then prints the estimate of
``kubeforge_runtime.fit`` for the same spec (``device="cpu"``), the measured delta and the
error. ``serve`` does the same for the server (``python -m kubeforge_runtime.serve``, engine: 8
concurrent sequences of up to 1024 tokens, 512 batch tokens) after 8 concurrent completions
through the official openai client, against ``fit.estimate_serving``. A benchmark, not a
test: it reports, it does not assert.

The window ends at the last training step: the final checkpoint and the output written by
rank 0 afterwards are host-side work outside the fit check (on GPUs they never touch device
memory). Precision is fp32 here (this CPU has no bf16 matrix units; bf16 autocast's extra
terms are unit-tested on the estimator instead).

    python benchmarks/bench_fit.py [--only NAME[,NAME]] [--json OUT.json]
    python benchmarks/bench_fit.py --from-json OUT.json   # re-print a run's table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))
DATA = REPO / "examples" / "data" / "text.jsonl"

BIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=12, num_attention_heads=8,
           num_key_value_heads=4, vocab_size=8192)
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048)

# name -> (processes, spec overrides). Sequence 256; micro-batch x sequence = the tokens of one forward.
CONFIGS: dict[str, tuple[int, dict[str, Any]]] = {
    "full": (1, {"training": {"microBatchSize": 4, "globalBatchSize": 4}}),
    "full-ckpt": (1, {"training": {"microBatchSize": 4, "globalBatchSize": 4, "gradientCheckpointing": True}}),
    "lora": (1, {"method": "lora", "training": {"microBatchSize": 4, "globalBatchSize": 4}}),
    "lora-ckpt": (1, {"method": "lora", "training": {"microBatchSize": 4, "globalBatchSize": 4,
                                                     "gradientCheckpointing": True}}),
    "fsdp-dp2": (2, {"training": {"microBatchSize": 2, "globalBatchSize": 4}}),
    "zero2-dp2": (2, {"parallelism": {"strategy": "deepspeed-zero2"},
                      "training": {"microBatchSize": 2, "globalBatchSize": 4}}),
    "zero3-dp2": (2, {"parallelism": {"strategy": "deepspeed-zero3"},
                      "training": {"microBatchSize": 2, "globalBatchSize": 4}}),
    "tp2": (2, {"parallelism": {"tensor": 2}, "training": {"microBatchSize": 4, "globalBatchSize": 4}}),
    "pp2": (2, {"parallelism": {"pipeline": 2}, "training": {"microBatchSize": 2, "globalBatchSize": 4}}),
}


def build_model(out: Path, shape: dict[str, int]) -> Path:
    """A random-weight Llama with the tiny tokenizer (kubeforge_runtime/tiny.py's way)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubeforge_runtime.tiny import build_tokenizer

    tok = build_tokenizer(out, vocab_size=min(2048, shape["vocab_size"]))
    cfg = LlamaConfig(**shape, max_position_embeddings=1024, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


def job_spec(model: Path, out: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The trainer's config (the FineTuneJob's training part) for one configuration."""
    spec: dict[str, Any] = {
        "kind": "FineTuneJob", "name": "fit", "namespace": "default", "model": {"uri": f"file://{model}"},
        "dataset": {"uri": f"file://{DATA}", "format": "text", "sequenceLength": 256, "packing": True,
                    "validationSplit": 0.0},
        "method": "full", "lora": {"r": 16, "alpha": 32, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "parallelism": {"strategy": "fsdp"},
        "training": {"maxSteps": 2, "seed": 0, "precision": "fp32"},
        "checkpoint": {"intervalSteps": 0, "keepLast": 1},
        "output": {"uri": f"file://{out}", "format": "merged"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            spec[key] = {**spec.get(key, {}), **value}
        else:
            spec[key] = value
    return spec


def _vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _workers(root: int) -> list[int]:
    """The trainer processes torchrun (pid ``root``) started."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == root:
            pids.append(int(entry))
    return pids


def train_command(spec: dict[str, Any], nproc: int, workdir: Path, threads: int) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of the runtime's train command under torchrun, ``spec`` written
    to ``workdir/config.json``."""
    config = workdir / "config.json"
    config.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), KUBEFORGE_METRICS_PORT="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "trainer_image"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "kubeforge_runtime.train", "--config", str(config)]
    return cmd, env


def measure(spec: dict[str, Any], nproc: int, workdir: Path, threads: int) -> int:
    """Peak RSS (bytes) of the largest worker when the last training step is reported."""
    cmd, env = train_command(spec, nproc, workdir, threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    peak = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("KUBEFORGE_EVENT "):
                continue
            event = json.loads(line.split(" ", 1)[1])
            if event.get("event") == "step" and event.get("step") == spec["training"]["maxSteps"]:
                peak = max(v for v in (_vm_hwm(p) for p in _workers(proc.pid)) if v)
                break
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the output phase is not measured (module docstring)
        except ProcessLookupError:
            pass
        proc.wait()
    if peak is None:
        raise RuntimeError("trainer ended before its last step:\n" + "".join(errors[-40:]))
    return peak


SERVE_ENGINE = {"backend": "auto", "dtype": "auto", "maxBatchTokens": 512, "maxConcurrentRequests": 8,
                "maxQueuedRequests": 32, "kvBlockSize": 16, "maxModelLength": 1024, "requestTimeoutSeconds": 600}


def serve_config(model: Path, port: int) -> dict[str, Any]:
    """The server's config as the operator renders it (engine: 8 sequences of 1024 tokens)."""
    return {"kind": "InferenceService", "name": "fit", "namespace": "default", "servedModelName": "fit",
            "model": {"uri": f"file://{model}"}, "adapters": [], "engine": dict(SERVE_ENGINE),
            "port": port, "grpcPort": 0}


def measure_server(model: Path, workdir: Path, threads: int, requests: int = 8) -> int:
    """Peak RSS (bytes) of the server process after ``requests`` concurrent completions
    through the official openai client."""
    import socket
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    import openai

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = workdir / "serve.json"
    config.write_text(json.dumps(serve_config(model, port)))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO / "trainer_image"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "kubeforge_runtime.serve", "--config", str(config),
                             "--host", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("server did not become ready:\n" + (proc.stderr.read() if proc.stderr else ""))
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)

        def one(i: int) -> None:
            client.completions.create(model="fit", prompt=f"Question {i}: what does a model learn?",
                                      max_tokens=32, temperature=0)

        with ThreadPoolExecutor(requests) as pool:
            list(pool.map(one, range(requests)))
        peak = _vm_hwm(proc.pid)
        assert peak is not None
        return peak
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def estimate_serve() -> Any:
    from kubeforge_runtime import fit

    return fit.estimate_serving(fit.Architecture.from_hf_config(BIG), fit.ServePlan.from_spec({"engine": SERVE_ENGINE}))


def estimate(spec: dict[str, Any], nproc: int) -> Any:
    from kubeforge_runtime import fit

    return fit.estimate_training(fit.Architecture.from_hf_config(BIG), fit.TrainPlan.from_spec(spec, world=nproc),
                                 device="cpu")


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'configuration':<12} {'estimate MiB':>12} {'measured MiB':>12} {'error':>8}   (baseline MiB)"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<12} {r['estimate'] / 2**20:12.0f} {r['measured'] / 2**20:12.0f} "
                     f"{(r['estimate'] - r['measured']) / r['measured']:+8.1%}   ({r['baseline'] / 2**20:.0f})")
    worst = max(abs(r["estimate"] - r["measured"]) / r["measured"] for r in rows)
    lines.append(f"largest error {worst:.1%} over {len(rows)} configurations")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--from-json", help="print the table of an earlier run's measurements")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
    else:
        names = [n for n in args.only.split(",") if n] or [*CONFIGS, "serve"]
        root = Path(tempfile.mkdtemp(prefix="bench-fit-"))
        big, base = build_model(root / "big", BIG), build_model(root / "base", BASE)
        saved = []
        for name in names:
            if name == "serve":
                started = time.time()
                (root / name).mkdir()
                measured = measure_server(big, root / name, args.threads)
                baseline = measure_server(base, root / name, args.threads)
                saved.append({"name": name, "nproc": 1, "spec": None, "peak": measured, "baseline": baseline})
                print(f"{name}: peak {measured / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB "
                      f"({time.time() - started:.0f} s)", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(saved, indent=1))
                continue
            nproc, overrides = CONFIGS[name]
            started = time.time()
            work = root / name
            work.mkdir()
            measured = measure(job_spec(big, work / "out", overrides), nproc, work, args.threads)
            baseline = measure(job_spec(base, work / "out-base", overrides), nproc, work, args.threads)
            saved.append({"name": name, "nproc": nproc, "spec": job_spec(big, work / "out", overrides),
                          "peak": measured, "baseline": baseline})
            print(f"{name}: peak {measured / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB "
                  f"({time.time() - started:.0f} s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(saved, indent=1))
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for s in saved:
        est = estimate_serve() if s["name"] == "serve" else estimate(s["spec"], s["nproc"])
        rows.append({"name": s["name"], "estimate": est.peak, "measured": s["peak"] - s["baseline"],
                     "baseline": s["baseline"], "terms": est.terms})
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
