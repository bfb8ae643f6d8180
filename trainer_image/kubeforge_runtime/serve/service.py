"""The serving core shared by the HTTP and gRPC front ends: models, admission, generation.

``ServingRuntime`` loads the base model and each LoRA adapter (one engine per served model
name; every adapter runs on the base model's own weight tensors, see :mod:`.adapters`), then
answers ``generate()`` calls. It owns everything both front ends must agree on:

* **Tokenizing.** ``tokenize`` and ``tokenize_chat`` run the tokenizer and the chat template
  on one worker thread, never on the event loop, so probes and streams keep answering while
  a long prompt is encoded; a text prompt too long to fit in any case (see
  :func:`.limits.prompt_char_limit`) is refused before it is tokenized. One thread, because
  a fast tokenizer is not safe to call from several threads at once.

* **Admission.** At most ``maxConcurrentRequests`` generations (choices) run at once, across
  all served models; a request takes the slots of all its choices together or waits holding
  none, and one that asks for more choices than there are slots is a :class:`BadRequest` at
  once. Up to ``maxQueuedRequests`` requests wait (FIFO, with backfill: see
  :class:`Admission`). Past that a request is refused at once with :class:`Overloaded`
  (HTTP 429 / gRPC RESOURCE_EXHAUSTED) carrying a Retry-After estimate, so a burst can never
  grow the queue or memory without bound.
* **Deadline.** ``requestTimeoutSeconds`` covers queueing and generation; past it the request
  is cancelled in the engine and the caller gets :class:`DeadlineExceeded`.
* **Cancellation.** When the caller stops iterating (client disconnected, stop sequence hit),
  the request is cancelled in the engine, which frees its KV-cache blocks and its slot.
* **Length.** ``max_tokens`` is clamped to ``maxModelLength - prompt length``; a prompt that
  leaves no room is a :class:`BadRequest`, as is a text prompt longer in characters than any
  text that fits (checked before tokenizing).
* **Metrics** under vLLM's names (see ``metrics.py``).

Called by ``app.py`` and ``grpc_server.py``; everything here runs on one asyncio loop, the
engines on their own threads.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .adapters import attach_adapter, weight_bytes
from .config import ServeConfig
from .engine import Engine, EngineEvent, EngineRequest, create_engine, select_backend
from .limits import longest_token_chars, prompt_char_limit
from .metrics import ServeMetrics

log = logging.getLogger(__name__)


class ServeError(Exception):
    """Base of the errors the front ends map to status codes."""

    http_status = 500


class BadRequest(ServeError):
    http_status = 400


class ModelNotFound(ServeError):
    http_status = 404


class Overloaded(ServeError):
    http_status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(ServeError):
    http_status = 503


class DeadlineExceeded(ServeError):
    http_status = 504


class GenerationFailed(ServeError):
    http_status = 500


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Delta:
    """A piece of a generation: new text, and on the last piece the finish reason and counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ServedModel:
    name: str
    engine: Engine
    parent: str | None = None  # the base model's name, for adapters
    lineage_digest: str | None = None  # ``digest`` of the model directory's kubeforge.json, if any


def _lineage_digest(model_dir: Any) -> str | None:
    """The lineage digest a served model reports (header, ``/v1/models``); a record whose
    digests do not match its content is still reported, with a warning in the log."""
    from .. import lineage

    record = lineage.read(model_dir)
    if record is None:
        return None
    problems = lineage.verify(record)
    if problems:
        log.warning("lineage record of %s does not verify: %s", model_dir, "; ".join(problems))
    digest = record.get("digest")
    return str(digest) if digest else None


@dataclass
class _Waiter:
    slots: int
    since: float
    future: asyncio.Future[None]


class Admission:
    """Generation slots, taken all at once per request, with a bounded waiting room.

    A request takes every slot its choices need in one step, or waits holding none: a request
    never sits on slots it cannot use yet while the requests beside it starve. The line is
    FIFO with backfill: a request that fits in the free slots may pass a larger one waiting
    ahead of it, but only while the head of the line has waited less than
    ``backfill_seconds``; after that nobody passes the head until it is admitted, so a stream
    of small requests cannot starve a large one.
    """

    def __init__(self, max_running: int, max_waiting: int, backfill_seconds: float) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.backfill_seconds = backfill_seconds
        self.running = 0  # slots taken
        self.waiting: list[_Waiter] = []
        self._avg_seconds = 1.0  # moving average of slot hold time, for Retry-After

    def retry_after(self) -> int:
        # Time until the queue ahead of a new request drains, roughly; at least one second.
        rounds = (len(self.waiting) + 1) / max(1, self.max_running)
        return max(1, math.ceil(rounds * self._avg_seconds))

    def _may_pass_head(self) -> bool:
        return not self.waiting or time.monotonic() - self.waiting[0].since < self.backfill_seconds

    async def acquire(self, slots: int, timeout: float) -> float:
        """Take ``slots`` slots together; return seconds spent waiting. Raise Overloaded or asyncio.TimeoutError."""
        if not 1 <= slots <= self.max_running:
            raise ValueError(f"cannot take {slots} of {self.max_running} slots")  # front ends refuse these first
        if slots <= self.max_running - self.running and self._may_pass_head():
            self.running += slots
            return 0.0
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(
                f"server is at capacity: {self.running} requests running and {len(self.waiting)} waiting "
                f"(maxQueuedRequests={self.max_waiting}); retry later",
                self.retry_after(),
            )
        start = time.monotonic()
        waiter = _Waiter(slots, start, asyncio.get_running_loop().create_future())
        self.waiting.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except BaseException:
            if waiter in self.waiting:
                self.waiting.remove(waiter)
                waiter.future.cancel()
                self._grant()  # it may have been the head that others were waiting behind
            elif waiter.future.done() and not waiter.future.cancelled():
                self.release(slots, 0.0)  # the slots were handed to us just as we gave up: pass them on
            raise
        return time.monotonic() - start

    def release(self, slots: int, held_seconds: float) -> None:
        if held_seconds > 0:
            self._avg_seconds = 0.9 * self._avg_seconds + 0.1 * held_seconds
        self.running -= slots
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to the waiters that fit, in line order (see the class docstring)."""
        i = 0
        while i < len(self.waiting) and self.running < self.max_running:
            waiter = self.waiting[i]
            if waiter.slots <= self.max_running - self.running:
                del self.waiting[i]
                self.running += waiter.slots
                waiter.future.set_result(None)
                continue
            if i == 0 and not self._may_pass_head():
                return
            i += 1


BACKFILL_SHARE = 0.25
"""Share of ``requestTimeoutSeconds`` during which smaller requests may pass a larger one
waiting at the head of the line (see :class:`Admission`)."""


class ServingRuntime:
    """Loads the served models and runs generations under the admission rules."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.models: dict[str, ServedModel] = {}
        self.tokenizer: Any = None
        self.max_model_length = 0
        self.vocab_size = 0
        self.weight_bytes: dict[str, int] = {}  # per served model: weight bytes it adds (adapters: beyond the base)
        self.backend = "unloaded"
        self.backend_reason = ""
        self.ready = threading.Event()
        self.load_error: str | None = None
        engine = config.engine
        self.admission = Admission(
            engine.max_concurrent_requests, engine.max_queued_requests, BACKFILL_SHARE * engine.request_timeout_seconds
        )
        self.metrics = ServeMetrics(self._kv_usage, self._prefix_stats)
        self.started_at = time.time()
        self.chars_per_token = 1  # the longest vocabulary entry, in characters (set by load)
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="kubeforge-tokenizer")

    # -- loading ---------------------------------------------------------------------------
    def load(self) -> None:
        """Load every model, build and warm its engine; sets ``ready``. Blocking (startup thread)."""
        import torch

        from .. import models as model_io

        cfg = self.config
        configure_cpu_threads()
        dtype = None if cfg.engine.dtype == "auto" else cfg.engine.dtype
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.monotonic()
        log.info("loading %s from %s on %s (dtype %s)", cfg.model_name, cfg.model.uri, device, cfg.engine.dtype)
        self.tokenizer = model_io.load_tokenizer(cfg.model.uri)
        self.chars_per_token = longest_token_chars(self.tokenizer)
        model_io.check_servable(model_io.resolve_model_dir(cfg.model.uri))
        base = model_io.load_causal_lm(cfg.model.uri, dtype=dtype, device=device).eval()
        self.max_model_length = self._max_length(base)
        text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        self.vocab_size = int(getattr(text_config, "vocab_size", None) or len(self.tokenizer))
        self.backend, self.backend_reason = select_backend(cfg.engine.batching, base)
        log.info("engine: %s (%s); maxModelLength %d", self.backend, self.backend_reason, self.max_model_length)
        engines: list[tuple[str, Any, str | None, str | None]] = [
            (cfg.model_name, base, None, _lineage_digest(model_io.resolve_model_dir(cfg.model.uri)))]
        for adapter in cfg.adapters:
            # One copy of the base weights for every adapter: each adapter's module tree shares
            # the base's tensors and carries its LoRA layers unmerged (see adapters.py). Built
            # before any engine starts, so no engine state on the base is copied.
            path = model_io.resolve_model_dir(adapter.uri)
            if not (path / "adapter_config.json").exists():
                raise model_io.ModelLoadError(
                    f"adapter {adapter.name!r}: {adapter.uri} holds no adapter_config.json; adapters[].uri must be "
                    "a LoRA adapter directory (serve a merged model as its own InferenceService)"
                )
            engines.append((adapter.name, attach_adapter(base, path, adapter.name), cfg.model_name,
                            _lineage_digest(path)))
        self.weight_bytes = weight_bytes({name: model for name, model, _, _ in engines}, cfg.model_name)
        log.info("weights: %s", ", ".join(f"{n} {b / 2**20:.1f} MiB" for n, b in self.weight_bytes.items()))
        for name, model, parent, digest in engines:
            engine = create_engine(self.backend, model.eval(), self.tokenizer, cfg.engine, self.max_model_length)
            engine.start()
            engine.warmup()
            self.models[name] = ServedModel(name, engine, parent, digest)
        log.info("ready: %s in %.1f s", ", ".join(self.models), time.monotonic() - t0)
        self.ready.set()

    def _max_length(self, model: Any) -> int:
        """``engine.maxModelLength`` (at most the model's own); when unset, the model's own
        length or, where the KV cache for ``maxConcurrentRequests`` sequences of it would not
        fit in memory, the longest that does (see :func:`memory_fitted_length`)."""
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        own = int(getattr(text_config, "max_position_embeddings", None) or 2048)
        engine = self.config.engine
        wanted = engine.max_model_length
        if wanted is not None:
            if wanted > own:
                log.warning("maxModelLength %d exceeds the model's %d; using %d", wanted, own, own)
            return int(min(wanted, own))
        # The cache and activations take the model's compute dtype (a quantized model's too).
        dtype_bytes = model.dtype.itemsize
        fitted = memory_fitted_length(
            own, engine.max_concurrent_requests, engine.max_batch_tokens, engine.kv_block_size,
            kv_bytes_per_token(text_config, dtype_bytes), dtype_bytes, available_memory_bytes(),
        )
        if fitted < own:
            log.warning("maxModelLength %d (of the model's %d): the KV cache for %d concurrent requests of %d tokens "
                        "would not fit in memory; set engine.maxModelLength, lower engine.maxConcurrentRequests or "
                        "give the pod more memory", fitted, own, engine.max_concurrent_requests, own)
        return fitted

    def stop(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        for served in self.models.values():
            try:
                served.engine.stop()
            except Exception:  # pragma: no cover - best effort at shutdown
                log.exception("stopping engine of %s", served.name)

    def dead_engines(self) -> list[str]:
        """Served models whose generation loop has died (after loading); empty when healthy."""
        if not self.ready.is_set():
            return []
        return [name for name, m in self.models.items() if not m.engine.healthy()]

    def _kv_usage(self) -> float:
        if not self.models:
            return 0.0
        return sum(m.engine.kv_cache_usage() for m in self.models.values()) / len(self.models)

    def _prefix_stats(self) -> dict[str, tuple[int, int]]:
        return {name: m.engine.prefix_cache_stats() for name, m in list(self.models.items())}

    # -- requests --------------------------------------------------------------------------
    def model(self, name: str) -> ServedModel:
        if not self.ready.is_set():
            raise NotReady("the model is still loading" if self.load_error is None else f"model failed to load: {self.load_error}")
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFound(f"the model {name!r} does not exist; served models: {', '.join(self.models)}") from None

    def check_prompt_chars(self, chars: int) -> None:
        """Refuse, before tokenizing, a text prompt longer than any text that fits."""
        limit = prompt_char_limit(self.max_model_length, self.chars_per_token)
        if chars > limit:
            raise BadRequest(
                f"the prompt is {chars} characters; this model's maximum length is {self.max_model_length} tokens "
                f"and one token covers at most {self.chars_per_token} characters, so no prompt over {limit} "
                "characters fits: shorten the prompt"
            )

    async def tokenize(self, text: str) -> list[int]:
        """Token ids of a text prompt, encoded off the event loop (see the module docstring)."""
        self.check_prompt_chars(len(text))
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, self.encode, text)

    async def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat, templated and encoded off the event loop."""
        self.check_prompt_chars(sum(len(m["content"]) for m in messages))
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, self.encode_chat, messages)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest("this model has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already wrote any BOS it wants; do not add another.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def clamp(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        room = self.max_model_length - len(prompt_ids)
        if not prompt_ids:
            raise BadRequest("the prompt is empty")
        if room < 1:
            raise BadRequest(
                f"the prompt is {len(prompt_ids)} tokens; this model's maximum length is {self.max_model_length} "
                "tokens, so there is no room to generate: shorten the prompt"
            )
        if any(t < 0 or t >= self.vocab_size for t in prompt_ids):
            raise BadRequest(f"prompt token ids must be in [0, {self.vocab_size}) for this model")
        return room if max_tokens is None else min(max_tokens, room)

    def check_choices(self, choices: int) -> None:
        """Refuse at once a request that could never be admitted: more choices than slots."""
        limit = self.config.engine.max_concurrent_requests
        if choices > limit:
            raise BadRequest(
                f"this request asks for {choices} choices (n x number of prompts); this server generates at most "
                f"{limit} at once (engine.maxConcurrentRequests): lower n or send fewer prompts per request"
            )

    async def admit(self, model_name: str, choices: int = 1) -> list["Ticket"]:
        """One slot per choice, all taken together; raises Overloaded at once when the waiting room is full."""
        served = self.model(model_name)
        self.check_choices(choices)
        deadline = time.monotonic() + self.config.engine.request_timeout_seconds
        try:
            self.metrics.waiting.labels(model_name).inc(choices)
            try:
                waited = await self.admission.acquire(choices, self.config.engine.request_timeout_seconds)
            finally:
                self.metrics.waiting.labels(model_name).dec(choices)
        except Overloaded:
            self.metrics.rejected.labels(model_name).inc()
            raise
        except asyncio.TimeoutError:
            self.metrics.success.labels(model_name, "timeout").inc(choices)
            raise DeadlineExceeded(
                f"request waited {self.config.engine.request_timeout_seconds:g} s for a free slot "
                "(requestTimeoutSeconds) and was dropped"
            ) from None
        self.metrics.queue_time.labels(model_name).observe(waited)
        self.metrics.running.labels(model_name).inc(choices)
        admitted_at = time.monotonic() - waited
        return [Ticket(self, served, deadline, admitted_at) for _ in range(choices)]

    def release(self, ticket: "Ticket") -> None:
        """Give the slot back; idempotent, so every cleanup path may call it."""
        if ticket.released:
            return
        ticket.released = True
        self.metrics.running.labels(ticket.served.name).dec()
        self.admission.release(1, time.monotonic() - ticket.admitted_at)

    async def generate(self, ticket: "Ticket", prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Stream a generation under an admitted ticket; always releases the ticket's slot.

        Raises DeadlineExceeded or GenerationFailed; if the caller stops iterating early
        (disconnect), the request is cancelled in the engine.
        """
        name = ticket.served.name
        engine = ticket.served.engine
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        request_id = uuid.uuid4().hex
        max_new = self.clamp(prompt_ids, params.max_tokens)
        eos = self.tokenizer.eos_token_id
        request = EngineRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            eos_token_ids=[eos] if eos is not None and not params.ignore_eos else [],
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=max(0, params.top_k),
            seed=params.seed,
        )
        start = ticket.admitted_at
        finished = False
        reason = "abort"
        tokens: list[int] = []
        try:
            loop_thread = threading.get_ident()

            def sink(ev: EngineEvent) -> None:
                # The continuous engine already delivers on this loop; hop threads only when needed.
                if threading.get_ident() == loop_thread:
                    events.put_nowait(ev)
                else:
                    loop.call_soon_threadsafe(events.put_nowait, ev)

            engine.submit(request, sink)
            self.metrics.prompt_tokens.labels(name).inc(len(prompt_ids))
            detok = _Detokenizer(self.tokenizer, params.stop)
            last_token_at: float | None = None
            while True:
                remaining = ticket.deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                if events.empty():
                    ev = await asyncio.wait_for(events.get(), remaining)
                else:
                    ev = events.get_nowait()
                # Events are cumulative: when the loop fell behind the engine, jump to the
                # newest one and emit the backlog as one piece instead of one per token.
                while not ev.finished and not ev.error and not events.empty():
                    ev = events.get_nowait()
                if ev.error:
                    reason = "error"
                    raise GenerationFailed(f"generation failed: {ev.error}")
                new = ev.token_ids[len(tokens):]
                if new:
                    t = time.monotonic()
                    if last_token_at is None:
                        self.metrics.ttft.labels(name).observe(t - start)
                    else:
                        for _ in new:
                            self.metrics.itl.labels(name).observe((t - last_token_at) / len(new))
                    last_token_at = t
                    tokens.extend(new)
                    self.metrics.generation_tokens.labels(name).inc(len(new))
                hit_eos = bool(tokens) and tokens[-1] in request.eos_token_ids
                text, stopped = detok.update(tokens, final=ev.finished or hit_eos)
                if stopped or ev.finished or hit_eos or len(tokens) >= max_new:
                    finished = ev.finished
                    reason = "stop" if (stopped or hit_eos) else "length"
                    yield Delta(text, reason, len(prompt_ids), len(tokens))
                    return
                if new:
                    # One piece per engine step that produced tokens, even when the bytes do
                    # not form a whole character yet (text ""): streaming clients then see
                    # progress, and time-to-first-token is measurable from the client side.
                    yield Delta(text)
        except asyncio.TimeoutError:
            reason = "timeout"
            raise DeadlineExceeded(
                f"request exceeded its {self.config.engine.request_timeout_seconds:g} s deadline "
                "(requestTimeoutSeconds) and was cancelled"
            ) from None
        finally:
            if not finished:
                engine.cancel(request_id)  # frees the cache blocks; no-op for finished ones
            # "abort": the caller went away (disconnect) before the generation ended.
            self.metrics.success.labels(name, reason).inc()
            if reason in ("stop", "length"):
                self.metrics.e2e.labels(name).observe(time.monotonic() - start)
            self.release(ticket)


KV_MEMORY_FRACTION = 0.2
"""Share of the memory available after loading that the default context length may take for
the preallocated KV cache and the attention masks (transformers' continuous batching checks
its own footprint against 30-90 % of free memory; this stays well below)."""


def kv_bytes_per_token(text_config: Any, dtype_bytes: int) -> int:
    """Bytes of keys and values one cached token takes over all layers."""
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    return 2 * int(text_config.num_hidden_layers) * kv_heads * head_dim * dtype_bytes


def memory_fitted_length(model_max: int, concurrency: int, batch_tokens: int, block: int, kv_per_token: int,
                         dtype_bytes: int, available: int | None) -> int:
    """The longest context (a multiple of ``block``, at most ``model_max``) for which the
    cache of ``concurrency`` full-length sequences plus the attention masks over them (the
    paged engine masks ``batch_tokens`` queries against every cached token) fit in
    ``KV_MEMORY_FRACTION`` of ``available`` bytes. Unknown memory: ``model_max``."""
    if not available:
        return model_max
    budget = KV_MEMORY_FRACTION * available - batch_tokens * batch_tokens * dtype_bytes
    per_length = concurrency * (kv_per_token + batch_tokens * dtype_bytes)
    fitted = int(max(0.0, budget) // per_length) // block * block
    if fitted < block:
        raise RuntimeError(
            f"not enough memory for a KV cache of {concurrency} requests: {available / 2**30:.1f} GiB available; "
            "lower engine.maxConcurrentRequests or engine.maxBatchTokens, or give the pod more memory")
    return min(model_max, fitted)


def available_memory_bytes() -> int | None:
    """Memory still free for this process: the GPU's free memory on CUDA, else the smaller of
    the system's available memory and what the cgroup limit leaves (None if unknown)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    try:
        import psutil
    except ImportError:
        return None
    free = int(psutil.virtual_memory().available)
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            free = min(free, int(limit) - psutil.Process().memory_info().rss)
    except (OSError, ValueError):
        pass
    return free


def cgroup_cpu_limit() -> int | None:
    """CPUs this container may use per its cgroup quota (v2 ``cpu.max`` or v1 cfs files), if limited."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        period_us = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def configure_cpu_threads() -> None:
    """Size torch's intra-op pool to the CPUs this pod may use, unless OMP_NUM_THREADS says.

    torch defaults to one thread per core of the *node*; in a pod limited to a few CPUs that
    oversubscribes the quota and every op waits on descheduled threads (measured here: 2-5x
    slower decode on a busy 2-core machine). The operator sets OMP_NUM_THREADS from the
    pod's CPU limit; this is the fallback when it does not.
    """
    import os

    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return
    limit = cgroup_cpu_limit()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = min(cores, limit) if limit else cores
    if threads != torch.get_num_threads():
        log.info("torch intra-op threads: %d (cgroup limit %s, cores %d)", threads, limit, cores)
        torch.set_num_threads(threads)


@dataclass
class Ticket:
    runtime: ServingRuntime
    served: ServedModel
    deadline: float
    admitted_at: float  # when the request arrived (before queueing), for latency metrics
    released: bool = False


class _Detokenizer:
    """Incremental text from cumulative token ids, with stop sequences.

    Holds back text that could be the start of a stop sequence, and text ending in an
    incomplete UTF-8 sequence (decoded as U+FFFD), until it is known to be final.
    """

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self._tok = tokenizer
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._emitted = 0

    def update(self, token_ids: list[int], final: bool) -> tuple[str, bool]:
        text = self._tok.decode(token_ids, skip_special_tokens=True)
        for stop in self._stops:
            at = text.find(stop)
            if at != -1:
                out = text[self._emitted : at] if at > self._emitted else ""
                self._emitted = max(self._emitted, at)
                return out, True
        end = len(text)
        if not final:
            end -= self._hold
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
        if end <= self._emitted:
            return "", False
        out = text[self._emitted : end]
        self._emitted = end
        return out, False
