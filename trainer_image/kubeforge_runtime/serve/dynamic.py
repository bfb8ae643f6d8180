"""The ``dynamic`` engine: dynamic batching on a contiguous KV cache, the portable fallback.

Used where transformers' continuous batching refuses the model or device (see
``engine.continuous_supported``) or when the config asks for it. One background thread:

1. takes the requests waiting in its queue, up to ``maxConcurrentRequests`` and
   ``maxBatchTokens`` prompt tokens, and prefills them as one left-padded batch;
2. decodes one token per row per step with a ``DynamicCache`` (contiguous, padded to the
   longest row), sampling each row with its own parameters (greedy, temperature, top-k,
   top-p, seed);
3. drops a row from the batch *and from the cache* the step it finishes or is cancelled,
   so a disconnected client stops costing compute at once;
4. when the batch is empty, starts over. Requests that arrive while a batch runs wait for
   the next one: that wait is the difference from continuous batching.

It needs nothing beyond a causal LM's ``forward`` with ``past_key_values``, so PEFT-wrapped,
quantized and remote-code models all run here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .engine import EngineEvent, EngineRequest, EventSink

if TYPE_CHECKING:
    import torch

    from .config import EngineConfig

log = logging.getLogger(__name__)


@dataclass
class _Row:
    request: EngineRequest
    sink: EventSink
    tokens: list[int] = field(default_factory=list)
    generator: Any = None


class DynamicBatchingEngine:
    """Batch-at-a-time generation with per-row early exit; see the module docstring."""

    name = "dynamic"

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig, max_model_length: int) -> None:
        self._model = model.eval()
        self._config = config
        self.max_model_length = max_model_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = int(pad if pad is not None else 0)
        self._queue: queue.Queue[_Row] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cache_tokens = 0  # rows x padded length currently held in the cache
        self._cache_bytes = 0
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        itemsize = next(model.parameters()).element_size() if model.dtype.is_floating_point else 4
        if not model.dtype.is_floating_point:  # quantized weights: activations and cache stay float32
            itemsize = 4
        self.bytes_per_token = 2 * cfg.num_hidden_layers * heads * head_dim * itemsize
        self.capacity_tokens = config.max_concurrent_requests * max_model_length
        # transformers 5.x renamed forward's ``past_key_values`` to ``cache`` (the old name is
        # deprecated); remote-code and PEFT-wrapped models may only know the old one.
        import inspect

        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        from .decode import decode_plan

        # Eager always: see serve/decode.py for why this engine does not compile.
        self.plan = decode_plan(config.compile, model.device.type).without_compile("the dynamic engine runs eager")
        if self.plan.note:
            log.warning("engine.compile is %s, but %s", config.compile, self.plan.note)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kubeforge-dynamic-engine", daemon=True)
        self._thread.start()
        log.info(
            "dynamic engine: contiguous KV cache, up to %d requests and %d prompt tokens per batch, %s",
            self._config.max_concurrent_requests,
            self._config.max_batch_tokens,
            self.plan.describe(),
        )

    def warmup(self) -> None:
        done = threading.Event()
        result: list[EngineEvent] = []

        def sink(ev: EngineEvent) -> None:
            if ev.finished:
                result.append(ev)
                done.set()

        self._queue.put(_Row(EngineRequest("kubeforge-warmup", [1, 2, 3, 4], 4, [], temperature=0.0), sink))
        if not done.wait(120):
            raise RuntimeError("warm-up generation did not finish within 120 s")
        if result[0].error:
            raise RuntimeError(f"warm-up generation failed: {result[0].error}")

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- requests -------------------------------------------------------------------------
    def submit(self, request: EngineRequest, sink: EventSink) -> None:
        self._queue.put(_Row(request, sink))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def kv_cache_usage(self) -> float:
        return min(1.0, self._cache_tokens / max(1, self.capacity_tokens))

    def prefix_cache_stats(self) -> tuple[int, int]:
        return 0, 0  # no prefix cache: every prompt is prefilled in full

    def kv_cache_info(self) -> dict[str, Any]:
        return {
            "kind": "contiguous",
            "capacityTokens": self.capacity_tokens,
            "bytesPerToken": self.bytes_per_token,
            "bytes": self._cache_bytes,
            "usage": self.kv_cache_usage(),
        }

    # -- the loop -------------------------------------------------------------------------
    def _take_batch(self) -> list[_Row]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        rows, tokens = [first], len(first.request.prompt_ids)
        while len(rows) < self._config.max_concurrent_requests:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                break
            if tokens + len(row.request.prompt_ids) > self._config.max_batch_tokens:
                # Over the token budget: it leads the next batch (re-queued at the back, which
                # can reorder by one batch; admission already bounds how long anyone waits).
                self._queue.put(row)
                break
            rows.append(row)
            tokens += len(row.request.prompt_ids)
        return rows

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stop.is_set():
                rows = self._take_batch()
                rows = [r for r in rows if not self._consume_cancel(r.request.request_id)]
                if not rows:
                    continue
                try:
                    self._run_batch(rows)
                except Exception as exc:  # one bad batch must not kill the server
                    log.exception("dynamic engine: batch of %d failed", len(rows))
                    for row in rows:
                        row.sink(EngineEvent(row.request.request_id, list(row.tokens), True, f"generation failed: {exc}"))
                finally:
                    self._cache_tokens = 0
                    self._cache_bytes = 0
        # Fail whatever is still queued so no client waits forever.
        while True:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                break
            row.sink(EngineEvent(row.request.request_id, [], True, "server is shutting down"))

    def _consume_cancel(self, request_id: str) -> bool:
        with self._lock:
            if request_id in self._cancelled:
                self._cancelled.discard(request_id)
                return True
        return False

    def _run_batch(self, rows: list[_Row]) -> None:
        import torch
        from transformers import DynamicCache

        device = self._model.device
        rows = [row for row in rows if self._seed(row)]
        if not rows:
            return
        width = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            p = row.request.prompt_ids
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)  # left padding: last column is live
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._model.config)
        out = self._model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}
        )
        while rows:
            logits = out.logits[:, -1, :].float()
            next_ids = [self._sample(logits[i], row) for i, row in enumerate(rows)]
            keep: list[int] = []
            for i, (row, tok) in enumerate(zip(rows, next_ids)):
                row.tokens.append(tok)
                req = row.request
                finished = tok in req.eos_token_ids or len(row.tokens) >= req.max_new_tokens
                if self._consume_cancel(req.request_id):
                    continue  # the client is gone: no event, row leaves the batch
                row.sink(EngineEvent(req.request_id, list(row.tokens), finished))
                if not finished:
                    keep.append(i)
            if not keep:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
            rows = [rows[i] for i in keep]
            step_ids = torch.tensor([[next_ids[i]] for i in keep], dtype=torch.long, device=device)
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            self._cache_tokens = len(rows) * mask.shape[1]
            self._cache_bytes = self._cache_tokens * self.bytes_per_token
            out = self._model(
                input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_kw: cache}
            )

    @staticmethod
    def _seed(row: _Row) -> bool:
        """Give a seeded row its generator; a seed torch refuses fails that row alone, not the batch."""
        if row.request.seed is None:
            return True
        import torch

        try:
            row.generator = torch.Generator(device="cpu").manual_seed(int(row.request.seed))
        except (ValueError, RuntimeError, OverflowError) as exc:
            row.sink(EngineEvent(row.request.request_id, [], True, f"seed {row.request.seed} cannot be used: {exc}"))
            return False
        return True

    @staticmethod
    def _sample(logits: torch.Tensor, row: _Row) -> int:
        import torch

        req = row.request
        if req.temperature <= 0:
            return int(torch.argmax(logits))
        scores = logits / req.temperature
        if req.top_k and req.top_k < scores.numel():
            kth = torch.topk(scores, req.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if req.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_scores.softmax(-1) > req.top_p  # keep the token that crosses top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = scores.softmax(-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=row.generator))
