"""Benchmark: the InferenceService server under concurrent load against one-at-a-time ``generate()``.

Same model, same prompts, same run. For the ``small`` preset (Llama-style, ~26 M parameters,
random weights) built on the fly, at 1, 8 and 32 concurrent clients (closed loop: each client
sends its next request when the previous one ends):

* **server** - ``python -m kubeforge_runtime.serve --config ...`` started as a subprocess,
  exactly as the pod runs it; clients stream ``/v1/completions`` over HTTP (SSE).
* **baseline** - the same requests served one at a time, in process, with plain
  ``model.generate()`` (greedy; a streamer only timestamps the first token). No HTTP, so the
  baseline pays no protocol cost: the comparison is conservative.

Reported per level: requests/s, generated tokens/s, p50/p99 time to first token and
end-to-end latency, server and baseline side by side with server/baseline ratios (for
latencies < 1 is better). Every request generates exactly ``--new-tokens`` tokens
(``ignore_eos``), prompts have mixed lengths.

Then KV-cache memory per cached token, measured on real tensors for the 32-request workload:
the paged cache (bytes of the blocks in use / tokens held, mid-generation) against a
contiguous cache (``DynamicCache`` of a left-padded batch, as batched ``generate()`` holds it)
and a contiguous cache preallocated to ``maxModelLength`` per sequence (what a static batch
must reserve to admit any request).

Run::

    python benchmarks/bench_serve.py            # 1, 8, 32 clients; 64 new tokens
    python benchmarks/bench_serve.py --quick    # fewer requests and tokens (CI)
    python benchmarks/bench_serve.py --backend dynamic   # the fallback engine instead

Timings on a shared 2-core machine vary by tens of percent between runs; the ratio within
one run is the figure to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))

from kubeforge_runtime import tiny  # noqa: E402

log = logging.getLogger("bench_serve")


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int


@dataclass
class LevelResult:
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0

    def row(self) -> dict[str, float]:
        ttft = sorted(s.ttft for s in self.samples)
        e2e = sorted(s.e2e for s in self.samples)
        tokens = sum(s.tokens for s in self.samples)
        return {
            "req_s": len(self.samples) / self.wall,
            "tok_s": tokens / self.wall,
            "ttft_p50": _pct(ttft, 50),
            "ttft_p99": _pct(ttft, 99),
            "e2e_p50": _pct(e2e, 50),
            "e2e_p99": _pct(e2e, 99),
        }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Mixed lengths, as real traffic: 16..96 prompt tokens; ids above the special tokens.
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 96))] for _ in range(n)]


# --- server under test -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_dir: Path, workdir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str, dict[str, Any]]:
    import httpx

    config = {
        "kind": "InferenceService",
        "name": "bench",
        "namespace": "default",
        "servedModelName": "bench",
        "model": {"uri": f"file://{model_dir}"},
        "adapters": [],
        "engine": {
            "batching": args.batching,
            "dtype": "auto",
            "maxBatchTokens": args.max_batch_tokens,
            "maxConcurrentRequests": 32,
            "maxQueuedRequests": 256,
            "kvBlockSize": args.kv_block_size,
            "maxModelLength": args.max_model_length,
            "requestTimeoutSeconds": 600,
        },
        "port": _free_port(),
        "grpcPort": None,
    }
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    log_file = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubeforge_runtime.serve", "--config", str(path), "--host", "127.0.0.1", "--log-level", "WARNING"],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO / "trainer_image") + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    base = f"http://127.0.0.1:{config['port']}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {workdir / 'server.log'}")
        try:
            r = httpx.get(base + "/ready", timeout=2)
            if r.status_code == 200:
                return proc, base, r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("server not ready in 600 s")


async def _server_level(base: str, prompts: list[list[int]], concurrency: int, new_tokens: int) -> LevelResult:
    import httpx

    result = LevelResult(concurrency)
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)

    async def client(http: httpx.AsyncClient) -> None:
        while True:
            try:
                prompt = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {
                "model": "bench",
                "prompt": prompt,
                "max_tokens": new_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            start = time.perf_counter()
            first = None
            tokens = 0
            async with http.stream("POST", base + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"server answered {r.status_code}: {await r.aread()!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    if first is None:
                        first = time.perf_counter()
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            end = time.perf_counter()
            result.samples.append(Sample((first or end) - start, end - start, tokens))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        result.wall = time.perf_counter() - t0
    return result


# --- baseline ------------------------------------------------------------------------------
class _FirstToken:
    """A generate() streamer that only records when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def baseline_level(model: Any, prompts: list[list[int]], concurrency: int, new_tokens: int) -> LevelResult:
    """``concurrency`` client threads; one worker serves their requests one at a time."""
    import queue as queue_mod

    import torch

    result = LevelResult(concurrency)
    work: queue_mod.Queue[tuple[list[int], float, threading.Event, list[Sample]] | None] = queue_mod.Queue()
    todo: queue_mod.Queue[list[int]] = queue_mod.Queue()
    for p in prompts:
        todo.put(p)

    def worker() -> None:
        while (item := work.get()) is not None:
            prompt, start, done, out = item
            streamer = _FirstToken()
            with torch.inference_mode():
                ids = torch.tensor([prompt])
                gen = model.generate(
                    ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=streamer, pad_token_id=0
                )
            end = time.perf_counter()
            out.append(Sample((streamer.first or end) - start, end - start, int(gen.shape[1] - ids.shape[1])))
            done.set()

    def client() -> None:
        while True:
            try:
                prompt = todo.get_nowait()
            except queue_mod.Empty:
                return
            done, out = threading.Event(), []  # type: ignore[var-annotated]
            work.put((prompt, time.perf_counter(), done, out))
            done.wait()
            result.samples.extend(out)

    w = threading.Thread(target=worker)
    w.start()
    t0 = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(concurrency)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    result.wall = time.perf_counter() - t0
    work.put(None)
    w.join()
    return result


# --- KV-cache memory ---------------------------------------------------------------------------
def kv_memory(model_dir: Path, prompts: list[list[int]], new_tokens: int, args: argparse.Namespace) -> dict[str, float]:
    """Bytes per cached token: paged (measured mid-run) vs contiguous (measured and preallocated)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from kubeforge_runtime.serve.config import EngineConfig
    from kubeforge_runtime.serve.continuous import ContinuousEngine
    from kubeforge_runtime.serve.engine import EngineRequest

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    max_len = args.max_model_length or 1024
    cfg = EngineConfig(max_concurrent_requests=len(prompts), max_batch_tokens=args.max_batch_tokens, kv_block_size=args.kv_block_size)

    # Paged: run the workload through the continuous engine; sample once every request is
    # past half its generation, reading the blocks in use and the tokens actually held.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    engine = ContinuousEngine(model, tok, cfg, max_len)
    engine.start()
    info = engine.kv_cache_info()
    progress = {i: 0 for i in range(len(prompts))}
    sampled: dict[str, float] = {}
    done = threading.Event()
    lock = threading.Lock()

    def sink_for(i: int) -> Any:
        def sink(ev: Any) -> None:
            with lock:
                progress[i] = len(ev.token_ids)
                if not sampled and all(v >= new_tokens // 2 for v in progress.values()):
                    live = sum(len(p) + progress[j] for j, p in enumerate(prompts))
                    used = engine.kv_cache_usage() * info["bytes"]
                    sampled.update(live_tokens=live, used_bytes=used)
                if all(v >= new_tokens for v in progress.values()):
                    done.set()

        return sink

    async def submit_all() -> None:
        for i, p in enumerate(prompts):
            engine.submit(EngineRequest(f"kv{i}", p, new_tokens, [], temperature=0.0), sink_for(i))
        while not done.is_set():
            await asyncio.sleep(0.01)

    asyncio.run(submit_all())
    engine.stop()
    bytes_per_token = float(info["bytesPerToken"])

    # Contiguous, as batched generate() holds it: a left-padded batch in a DynamicCache,
    # measured at the same point (half the new tokens generated).
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens // 2,
                       min_new_tokens=new_tokens // 2, do_sample=False, pad_token_id=0)
    contiguous_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    contiguous_live = sum(len(p) + new_tokens // 2 for p in prompts)
    return {
        "bytesPerTokenRaw": bytes_per_token,
        "pagedBytesPerCachedToken": sampled["used_bytes"] / sampled["live_tokens"],
        "contiguousPaddedBytesPerCachedToken": contiguous_bytes / contiguous_live,
        "contiguousPreallocatedBytesPerCachedToken": bytes_per_token * max_len * len(prompts) / sampled["live_tokens"],
        "maxModelLength": max_len,
        "blockSize": args.kv_block_size,
    }


# --- report ------------------------------------------------------------------------------------
def _fmt_row(c: int, s: dict[str, float], b: dict[str, float]) -> list[str]:
    out = [f"{c:>3}"]
    for key, unit, scale in (("req_s", "", 1), ("tok_s", "", 1), ("ttft_p50", "ms", 1000), ("ttft_p99", "ms", 1000),
                             ("e2e_p50", "ms", 1000), ("e2e_p99", "ms", 1000)):
        out.append(f"{s[key] * scale:9.1f} {b[key] * scale:9.1f} {s[key] / b[key]:6.2f}x")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens (CI)")
    parser.add_argument("--batching", default="auto", choices=["auto", "continuous", "dynamic"])
    parser.add_argument("--model", type=Path, help="a model directory (default: build the small preset)")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 64; quick 32)")
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--kv-block-size", type=int, default=16)
    parser.add_argument("--max-model-length", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads for both server and baseline (default 1: on a shared 2-core "
        "machine more threads oversubscribe and make both sides noisier)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    new_tokens = args.new_tokens or (32 if args.quick else 64)
    levels = [int(x) for x in args.levels.split(",")]

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server subprocess
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        model_dir = args.model or tiny.build_tiny_llama(work / "model", preset="small", seed=0)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        vocab = min(model.config.vocab_size, 2000)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.1f M parameters; torch threads %d", model_dir, n_params / 1e6, torch.get_num_threads())

        def count(c: int) -> int:
            return max(c, 4) if args.quick else max(2 * c, 8)

        # Baseline first (the server process is not running yet, so it competes with nothing).
        with torch.inference_mode():  # warm-up
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        baseline: dict[int, dict[str, float]] = {}
        for c in levels:
            log.info("baseline: %d clients, %d requests", c, count(c))
            baseline[c] = baseline_level(model, _prompts(count(c), vocab, seed=c), c, new_tokens).row()
        del model

        proc, base, ready = start_server(model_dir, work, args)
        try:
            asyncio.run(_server_level(base, _prompts(2, vocab, seed=99), 2, 4))  # warm-up
            server: dict[int, dict[str, float]] = {}
            for c in levels:
                log.info("server (%s engine): %d clients, %d requests", ready["engine"], c, count(c))
                server[c] = asyncio.run(_server_level(base, _prompts(count(c), vocab, seed=c), c, new_tokens)).row()
        finally:
            proc.terminate()
            proc.wait(timeout=60)

        log.info("KV-cache memory for %d requests", max(levels))
        kv = kv_memory(Path(model_dir), _prompts(max(levels), vocab, seed=max(levels)), new_tokens, args)

    engine = ready["engine"]
    print()
    print(f"bench_serve: small preset ({n_params / 1e6:.1f} M params), {new_tokens} new tokens/request, prompts 16-96 tokens, "
          f"engine={engine} ({ready.get('engineReason', '')}), kvBlockSize={args.kv_block_size}, "
          f"maxBatchTokens={args.max_batch_tokens}{' [quick]' if args.quick else ''}")
    print(f"columns: server | baseline (one at a time, plain generate()) | ratio server/baseline; torch threads {args.threads}")
    header = ["  c", "requests/s", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "e2e p50 ms", "e2e p99 ms"]
    print(" | ".join(f"{h:^28}" if i else h for i, h in enumerate(header)))
    for c in levels:
        print(" | ".join(_fmt_row(c, server[c], baseline[c])))
    print()
    print(f"KV cache, {max(levels)} concurrent requests, bytes per cached token (raw K+V per token: {kv['bytesPerTokenRaw']:.0f}):")
    paged = kv["pagedBytesPerCachedToken"]
    print(f"  paged (blocks of {kv['blockSize']}), measured mid-run      {paged:10.0f}")
    print(f"  contiguous, left-padded batch (DynamicCache)        {kv['contiguousPaddedBytesPerCachedToken']:10.0f}  "
          f"({kv['contiguousPaddedBytesPerCachedToken'] / paged:.2f}x paged)")
    print(f"  contiguous, preallocated to maxModelLength={kv['maxModelLength']:<5}   {kv['contiguousPreallocatedBytesPerCachedToken']:10.0f}  "
          f"({kv['contiguousPreallocatedBytesPerCachedToken'] / paged:.2f}x paged)")
    if args.json:
        args.json.write_text(json.dumps({"engine": engine, "newTokens": new_tokens, "server": server, "baseline": baseline, "kv": kv}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
