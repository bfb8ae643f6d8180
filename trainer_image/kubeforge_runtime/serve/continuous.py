"""The ``continuous`` engine: transformers' continuous-batching manager with a paged KV cache.

Every forward pass mixes the prefill of newly admitted requests with one decode step of the
running ones; a request leaves the batch, and gives back its cache blocks, the step it ends
or is cancelled. The cache is one preallocated tensor cut into blocks of ``kvBlockSize``
tokens (transformers' ``page_size``), so memory per cached token is the size of one token's
keys and values plus at most one partly filled block per request, instead of a contiguous
``max_length`` slab per sequence.

Sampling: the manager samples batch-wide (argmax or multinomial for the whole batch), but
temperature, top-k and top-p can be per request. We therefore run it in sampling mode with
per-request processors and express a greedy request as ``top_k=1``: the multinomial then has
exactly one candidate, which is the argmax, so greedy output equals ``generate(do_sample=False)``
token for token (a test checks this). A per-request ``seed`` cannot be honoured here. On the
eager plan the warpers and the draw work only on the rows they change (:mod:`.sampling`):
transformers' versions sort the whole vocabulary for every row of every step.

Attention: with ``sdpa`` transformers' paged path scores every query of the batch against the
keys of *every* request under a block-diagonal mask it builds in Python each step. On the
eager plan the engine switches the model to :mod:`.attention`'s per-request attention (each
request's queries against its own keys; no mask is built; decoding-only steps read their keys
from the paged cache once, padded per request), which gives the same tokens (a test compares
them); README "Serving" has what it changed end to end.

Also on the eager plan, ``lm_head`` projects only the rows that predict a token (the manager
would project every prompt token of a prefill and keep the last): :func:`logits_for_new_tokens_only`;
on CPU a one-row step (one request decoding) projects with a ``[hidden, vocab]`` copy of the
weight, which measured about twice as fast for one row (:mod:`.lm_head`).
And q/k/v and gate/up run as one matmul each per layer, RMSNorm as one call (:mod:`.fused`),
as vLLM merges them; LoRA-wrapped and quantized projections keep their own.

Sizing on CPU matters: left to itself the manager would size the cache from 90 % of free
*system* memory. We always pass ``num_blocks`` (enough for ``maxConcurrentRequests``
sequences of ``maxModelLength`` tokens) and ``max_batch_tokens`` explicitly.

Prefix caching (``engine.prefixCaching``, on by default) is the manager's block sharing: every
completely written block is hashed (chained over the blocks before it), and a new request
whose prompt starts with the same blocks - a chat's system prompt, a few-shot preamble -
reuses them instead of computing them again (at least one prompt token is always computed).
Blocks of finished requests stay cached until the scheduler needs the room and evicts them.
Two consequences we handle here: the KV-usage figure counts only blocks that running
requests hold (cached-but-unreferenced blocks are free capacity, not load, or an idle server
would report a full cache to the autoscaler), and the prefix-cache counters of vLLM
(``vllm:prefix_cache_queries`` / ``_hits``, in tokens) are kept by wrapping the cache's
``search_prefix_match`` - the one place the manager looks a prompt up - on our instance.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from . import attention, fused, lm_head, sampling
from .engine import EngineEvent, EngineRequest, EventSink

if TYPE_CHECKING:
    from .config import EngineConfig

log = logging.getLogger(__name__)

_BIG_TOP_K = 1 << 30  # "no top-k": larger than any vocabulary; the warper clamps it to the vocab size


class ContinuousEngine:
    """Adapter from the :class:`~.engine.Engine` protocol to ``ContinuousBatchingManager``."""

    name = "continuous"

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig, max_model_length: int) -> None:
        from transformers import GenerationConfig

        try:
            from transformers import ContinuousBatchingConfig
        except ImportError:  # older 5.x kept it in configuration_utils only
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

        from .decode import decode_plan

        self._model = model
        self._config = config
        self.plan = decode_plan(config.compile, model.device.type)
        self.max_model_length = max_model_length
        # Capacity for every admitted request at full length: admission (not the cache) is then
        # the only place requests wait, and the manager never has to evict and re-prefill.
        tokens = config.max_concurrent_requests * max_model_length
        self.num_blocks = max(4, math.ceil(tokens / config.kv_block_size))
        self.max_batch_tokens = max(config.max_batch_tokens, 16)
        eos = tokenizer.eos_token_id
        # temperature/top_p values here only make transformers create the per-request warpers
        # (it skips a warper whose default is neutral); every request passes its own values.
        generation_config = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_p=0.5,
            top_k=_BIG_TOP_K,
            max_new_tokens=max_model_length,
            eos_token_id=eos if eos is not None else -1,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        )
        cb_config = ContinuousBatchingConfig(
            page_size=config.kv_block_size,
            num_blocks=self.num_blocks,
            max_batch_tokens=self.max_batch_tokens,
            max_requests_per_batch=config.max_concurrent_requests,
            per_request_processors=True,
            # Prefix caching; kv_cache_usage() below counts cached-but-unreferenced blocks as free.
            allow_block_sharing=config.prefix_caching,
            auto_switch_to_flash=True,
            **self.plan.continuous_batching_kwargs(),
        )
        self._manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        # Eager plan: top-k/top-p and the draw only on the rows they change (serve/sampling.py);
        # a compiled step or CUDA graph keeps transformers' fixed-shape versions.
        self._eager_plan = not (self.plan.compile or self.plan.cuda_graphs)
        if self._eager_plan:
            sampling.install(self._manager)
        # Eager plan with sdpa: each request attends to its own keys only (serve/attention.py);
        # must happen before warmup() builds the batch processor (which then builds no masks).
        self.per_request_attention = self._eager_plan and attention.install(self._manager)
        self.merged: dict[str, int] = {}  # what serve/fused.py merged (eager plan), by kind
        self._sinks: dict[str, EventSink] = {}
        self._lock = threading.Lock()
        self._prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self._prefix_hits = 0  # of which found cached
        self._looked_up: set[str] = set()  # requests counted already (the scheduler may look one up twice)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        # Builds the paged cache, and with a compiled or graphed plan compiles the batch step and
        # captures the CUDA graphs for every padded size: before /ready, never on a request.
        self._manager.warmup()
        if self._eager_plan:
            sampling.install_sampler(self._manager.batch_processor.model_runner)
            logits_for_new_tokens_only(self._manager.batch_processor, self._model)
            if self._model.device.type == "cpu":
                lm_head.install(self._model)  # one-row steps: the projection's [hidden, vocab] copy
            # One matmul for q/k/v and one for gate/up per layer, RMSNorm in one call (serve/fused.py).
            self.merged = {**fused.install(self._model), "rms_norm": fused.install_rms_norm(self._model)}
        cache = self._manager.batch_processor.cache
        self._count_prefix_lookups(cache)  # the manager keeps this cache object across start()
        if self.per_request_attention:
            attention.install_cache_reads(cache)
        self._manager.start()
        log.info(
            "continuous engine: paged KV cache of %d blocks x %d tokens (%.1f MiB), max %d batch tokens, "
            "%d requests per batch, attention %s, merged %s, %s",
            cache.num_blocks,
            self._config.kv_block_size,
            cache.cache_tensor.nbytes / 2**20,
            cache.max_batch_tokens,
            self._config.max_concurrent_requests,
            self._model.config._attn_implementation,
            self.merged or "none",
            self.plan.describe(),
        )

    def warmup(self) -> None:
        # Without a registered handler the manager routes outputs to its shared queue.
        rid = "kubeforge-warmup"
        self._manager.add_request([1, 2, 3, 4], request_id=rid, max_new_tokens=4, eos_token_id=-1, top_k=1, temperature=1.0, top_p=1.0)
        # A compiled plan compiles the shapes of a real request here (a one-token decode step),
        # which takes minutes on a busy CPU.
        limit = 600 if self.plan.compile else 120
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            out = self._manager.get_result(request_id=rid, timeout=1.0)
            if out is not None and out.is_finished():
                if out.error:
                    raise RuntimeError(f"warm-up generation failed: {out.error}")
                with self._lock:  # the warm-up's lookup is not a client's
                    self._prefix_queries = self._prefix_hits = 0
                    self._looked_up.discard(rid)
                return
        raise RuntimeError(f"warm-up generation did not finish within {limit} s")

    def healthy(self) -> bool:
        return self._manager.is_running() and self._manager.background_thread_status.fatal_error is None

    def stop(self) -> None:
        self._manager.stop(block=True, timeout=10)

    # -- requests -------------------------------------------------------------------------
    def submit(self, request: EngineRequest, sink: EventSink) -> None:
        greedy = request.temperature <= 0
        with self._lock:
            self._sinks[request.request_id] = sink

        def deliver(output: Any) -> None:  # runs on the asyncio loop (call_soon_threadsafe)
            with self._lock:
                target = self._sinks.get(output.request_id)
                if output.is_finished():
                    self._sinks.pop(output.request_id, None)
                    self._looked_up.discard(output.request_id)
            if target is None:  # cancelled: drop whatever was already in flight
                return
            target(
                EngineEvent(
                    request_id=output.request_id,
                    token_ids=list(output.generated_tokens),
                    finished=output.is_finished(),
                    error=output.error,
                )
            )

        # Must be registered before the request is queued, or early tokens go to the shared queue.
        self._manager.register_result_handler(request.request_id, deliver)
        rid = self._manager.add_request(
            request.prompt_ids,
            request_id=request.request_id,
            max_new_tokens=request.max_new_tokens,
            streaming=True,
            eos_token_id=request.eos_token_ids or -1,
            temperature=1.0 if greedy else float(request.temperature),
            top_k=1 if greedy else int(request.top_k or _BIG_TOP_K),
            top_p=1.0 if greedy else float(request.top_p),
        )
        if rid is None:  # the manager refuses new work (stopping or crashed)
            with self._lock:
                self._sinks.pop(request.request_id, None)
            sink(EngineEvent(request.request_id, finished=True, error="generation loop is not accepting requests"))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            known = self._sinks.pop(request_id, None) is not None
            self._looked_up.discard(request_id)
        if not known:
            return
        self._manager.cancel_request(request_id)
        router = self._manager.output_router
        # A cancelled request never finishes, so the manager never drops its handler; drop it
        # ourselves once in-flight outputs have drained (the deliver() above ignores them).
        timer = threading.Timer(2.0, self._forget, args=(router, request_id))
        timer.daemon = True  # never hold up process exit
        timer.start()

    @staticmethod
    def _forget(router: Any, request_id: str) -> None:
        with router._lock:
            router.result_handlers.pop(request_id, None)
        # Outputs that raced past the handler removal land on the shared queue, which nobody
        # reads while serving: drain it so it cannot grow.
        try:
            while True:
                router.output_queue.get_nowait()
        except queue.Empty:
            pass

    # -- prefix cache ---------------------------------------------------------------------
    def _count_prefix_lookups(self, cache: Any) -> None:
        """Count the tokens each request looks up in the prefix cache and the tokens found.

        ``search_prefix_match(request_id, prompt_ids) -> matched tokens`` runs on the manager's
        thread once per pending request and scheduling round; a request that is not scheduled
        in a round is looked up again in the next, so each request counts once.
        """
        search = cache.search_prefix_match

        def counted(request_id: str, prompt_ids: list[int]) -> int:
            matched = int(search(request_id, prompt_ids))
            with self._lock:
                if request_id not in self._looked_up:
                    self._looked_up.add(request_id)
                    self._prefix_queries += len(prompt_ids)
                    self._prefix_hits += matched
            return matched

        cache.search_prefix_match = counted

    def prefix_cache_stats(self) -> tuple[int, int]:
        """Prompt tokens looked up in the prefix cache and tokens found there, since start."""
        with self._lock:
            return self._prefix_queries, self._prefix_hits

    # -- introspection --------------------------------------------------------------------
    def kv_cache_usage(self) -> float:
        """Share of the cache that running requests hold.

        The manager's own ``compute_free_capacity`` counts blocks kept only for prefix reuse
        (referenced by no request) as taken; they are given back the moment room is needed,
        so here they count as free.
        """
        bp = self._manager.batch_processor
        if bp is None:
            return 0.0
        return kv_used_fraction(bp.cache)

    def kv_cache_info(self) -> dict[str, Any]:
        bp = self._manager.batch_processor
        if bp is None:
            return {"kind": "paged"}
        cache = bp.cache
        data_bytes = cache.num_sectors * cache.bytes_per_sector
        capacity_tokens = cache.num_blocks * self._config.kv_block_size
        return {
            "kind": "paged",
            "blockSize": self._config.kv_block_size,
            "numBlocks": int(cache.num_blocks),
            "capacityTokens": int(capacity_tokens),
            "bytes": int(data_bytes),
            "bytesPerToken": data_bytes / max(1, capacity_tokens),
            "usage": self.kv_cache_usage(),
            "prefixCaching": bool(getattr(cache, "use_prefix_sharing", False)),
        }


def logits_for_new_tokens_only(batch_processor: Any, model: Any) -> bool:
    """Make the batch step project only the positions that predict a token through ``lm_head``.

    The manager computes the logits of *every* query token of a step and keeps the rows of
    ``logits_indices`` (the last prompt token of each prefill, each decoding token) only
    afterwards; a prefill of ``n`` prompt tokens thus pays ``n - 1`` rows of the vocabulary
    projection (SmolLM2: 49,152 x 576, a fifth of a token's linear work) for nothing. Passing
    ``logits_indices`` as the model's ``logits_to_keep`` slices the hidden states before
    ``lm_head`` instead (the manager then skips its own slicing); the logits kept are the same.
    Eager plan only (a compiled or graphed step keeps its shapes); returns whether it applied.
    """
    supports = getattr(model, "_supports_logits_to_keep", None)
    if not (callable(supports) and supports()):
        return False
    io = batch_processor.inputs_and_outputs
    get_model_kwargs = io.get_model_kwargs

    def with_logits_to_keep(*args: Any, **kwargs: Any) -> Any:
        batch = get_model_kwargs(*args, **kwargs)
        batch["logits_to_keep"] = batch["logits_indices"]
        return batch

    io.get_model_kwargs = with_logits_to_keep
    return True


def kv_used_fraction(cache: Any) -> float:
    """Bytes of the paged cache held by requests over its capacity, 0..1.

    Free: whole free sectors, free blocks inside sectors already handed to an allocator, and
    blocks in an allocator's ledger kept only for prefix reuse (``cached_blocks``: no request
    references them; the scheduler evicts them before it would refuse work).
    """
    total = cache.num_sectors * cache.bytes_per_sector
    free = len(cache.pool.free_sectors) * cache.bytes_per_sector
    for allocator in cache.cache_allocators.values():
        reusable = allocator.pool.count_free_blocks(allocator.index) + len(allocator.ledger.cached_blocks)
        free += reusable * allocator.bytes_per_block
    return max(0.0, min(1.0, 1.0 - free / max(1, total)))
