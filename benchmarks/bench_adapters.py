"""Benchmark: LoRA adapters on one shared base against one merged copy of the base per adapter.

Two ways to serve a base model plus ``--adapters`` LoRA adapters, each in a fresh process
started exactly like the server (``ServerThread``: load, warm up, serve over HTTP):

* **shared** - what the server does: every adapter's module tree shares the base model's
  weight tensors and carries its LoRA layers unmerged (``kubeforge_runtime.serve.adapters``);
* **merged-copies** - the baseline, what the server did before: a fresh copy of the base per
  adapter with the adapter merged in (full speed, one base copy per adapter).

Reported per way: the process's resident memory after loading minus before (RSS, from
``/proc``; torch, transformers and peft imported before the first reading), the distinct
tensor storage behind all served models, what each adapter adds to it, and the KV-cache bytes
of each engine (every served model has its own engine and cache). Then the price of not
merging: greedy decode tokens/s at batch 1 of the base, the adapter unmerged on the shared
base and the adapter merged into a copy, with ``generate()`` in one process, interleaved
round by round (best round), so machine load hits all three alike. Adapters are random (non-zero) LoRA matrices of rank
``--rank`` on every linear layer of the decoder, written with peft.

Run::

    python benchmarks/bench_adapters.py                 # embedded SmolLM2-135M-Instruct, 2 adapters
    python benchmarks/bench_adapters.py --model small --adapters 3 --new-tokens 16 --rounds 2

Timings on a shared 2-core machine vary by tens of percent between runs; memory much less.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))
sys.path.insert(0, str(REPO / "operator"))

log = logging.getLogger("bench_adapters")
MODES = ("shared", "merged-copies")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_bytes() -> int:
    """Resident set size of this process, from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_adapters(model_dir: Path, out: Path, count: int, rank: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                     init_lora_weights=False))
        with torch.no_grad():  # peft's random init is large for a real model: keep the outputs readable
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)
        path = out / f"adapter-{i}"
        peft_model.save_pretrained(str(path))
        paths.append(path)
    return paths


def _merged_copy(model_uri: str) -> Any:
    """The baseline's adapter loader: a fresh base per adapter, the adapter merged in."""
    from kubeforge_runtime import models as model_io

    def attach(base: Any, path: Any, name: str) -> Any:
        from peft import PeftModel

        copy = model_io.load_causal_lm(model_uri, dtype=None, device=str(base.device))
        return PeftModel.from_pretrained(copy, str(path), adapter_name=name).merge_and_unload().eval()

    return attach


def child(mode: str, config_path: Path) -> dict[str, Any]:
    """Serve the config in this process the way ``mode`` says; measure its memory."""
    import peft  # noqa: F401  (imported before the first reading: only loading should count)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from kubeforge_runtime.serve import service
    from kubeforge_runtime.serve.adapters import unique_tensor_bytes
    from kubeforge_runtime.serve.config import load_config
    from kubeforge_runtime.serve.server import ServerThread

    config = load_config(config_path)
    if mode == "merged-copies":
        service.attach_adapter = _merged_copy(config.model.uri)  # type: ignore[assignment]
    before = rss_bytes()
    server = ServerThread(config).start(wait_ready=1800)
    after = rss_bytes()
    runtime = server.runtime
    modules = {n: m.engine._model for n, m in runtime.models.items()}  # type: ignore[attr-defined]
    base_name = config.model_name
    base_bytes = unique_tensor_bytes([modules[base_name]])
    added = {n: unique_tensor_bytes([modules[base_name], m]) - base_bytes for n, m in modules.items() if n != base_name}
    kv = {n: int(m.engine.kv_cache_info().get("bytes", 0)) for n, m in runtime.models.items()}
    server.stop()
    return {"mode": mode, "rssLoadBytes": after - before, "baseWeightBytes": base_bytes,
            "distinctWeightBytes": unique_tensor_bytes(modules.values()), "adapterAddedBytes": added,
            "kvCacheBytes": kv}


def decode_speed(model_dir: Path, adapter: Path, new_tokens: int, rounds: int) -> dict[str, float]:
    """Greedy decode tokens/s at batch 1 of the base, the adapter on the shared base (unmerged)
    and the adapter merged into a copy, interleaved round by round in this process; best round."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubeforge_runtime.serve.adapters import attach_adapter

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    models = {
        "base": base,
        "shared": attach_adapter(base, adapter, "a"),
        "merged": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
                                            str(adapter)).merge_and_unload().eval(),
    }
    ids = torch.tensor([[1, 400, 2000, 31, 7, 99, 1234, 5]])
    best = dict.fromkeys(models, 0.0)
    with torch.inference_mode():
        for _ in range(rounds):
            for name, model in models.items():
                t0 = time.perf_counter()
                model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                best[name] = max(best[name], new_tokens / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory, or 'small' (random 26 M preset); "
                        "default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="decode-speed rounds (best one counts)")
    parser.add_argument("--max-concurrent", type=int, default=4, help="engine.maxConcurrentRequests (sizes each KV cache)")
    parser.add_argument("--max-model-length", type=int, default=512)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.child:
        print("RESULT " + json.dumps(child(args.child, Path(args.config))), flush=True)
        return

    from kubeforge_runtime import embedded, tiny

    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        work = Path(tmp)
        if args.model == "small":
            model_dir = tiny.build_tiny_llama(work / "small", preset="small", seed=0)
        else:
            model_dir = Path(args.model) if args.model else embedded.ensure()
        adapters = make_adapters(model_dir, work, args.adapters, args.rank)
        config = {
            "name": "base", "model": {"uri": f"file://{model_dir}"},
            "adapters": [{"name": f"adapter-{i}", "uri": f"file://{p}"} for i, p in enumerate(adapters)],
            "engine": {"batching": "continuous", "maxConcurrentRequests": args.max_concurrent,
                       "maxModelLength": args.max_model_length, "maxBatchTokens": 512},
            "port": 0, "grpcPort": None,
        }
        config_path = work / "config.json"
        config_path.write_text(json.dumps(config))
        results = {}
        for mode in MODES:
            log.info("-- %s", mode)
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--config", str(config_path)],
                                  capture_output=True, text=True, cwd=REPO)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            results[mode] = json.loads(line[len("RESULT "):])
            log.info("%s: %s", mode, json.dumps(results[mode]))
        log.info("-- decode speed")
        results["speed"] = decode_speed(model_dir, adapters[0], args.new_tokens, args.rounds)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    mib = 2**20
    print(f"\n{args.adapters} adapters, LoRA rank {args.rank} on {', '.join(TARGETS)}; "
          f"KV cache per engine: {args.max_concurrent} x {args.max_model_length} tokens")
    print(f"{'way':<14} {'RSS after load':>15} {'distinct weights':>17} {'per adapter':>12} {'KV per engine':>14}")
    for mode in MODES:
        r = results[mode]
        print(f"{mode:<14} {r['rssLoadBytes'] / mib:>11.0f} MiB {r['distinctWeightBytes'] / mib:>13.0f} MiB "
              f"{max(r['adapterAddedBytes'].values()) / mib:>8.1f} MiB {max(r['kvCacheBytes'].values()) / mib:>10.1f} MiB")
    shared, merged = results["shared"], results["merged-copies"]
    base = shared["baseWeightBytes"]
    print(f"\nper extra adapter, shared: {max(shared['adapterAddedBytes'].values()) / base:.3f} of the base weights "
          f"({base / mib:.0f} MiB); merged copies: {max(merged['adapterAddedBytes'].values()) / base:.3f}")
    print(f"RSS after load, shared / merged copies: {shared['rssLoadBytes'] / merged['rssLoadBytes']:.2f}x")
    sp = results["speed"]
    print(f"greedy decode at batch 1 (generate(), {args.new_tokens} tokens, best of {args.rounds} interleaved rounds): "
          f"base {sp['base']:.1f}, adapter unmerged on the shared base {sp['shared']:.1f}, adapter merged {sp['merged']:.1f} "
          f"tokens/s; unmerged / merged {sp['shared'] / sp['merged']:.2f}x")


if __name__ == "__main__":
    main()
