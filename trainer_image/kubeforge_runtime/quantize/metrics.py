"""Size, perplexity and per-token latency of a causal LM: what a QuantizeJob reports.

Called by the runner (before and after quantization, on the same data) and by
``benchmarks/bench_quantize.py``. Definitions, so the numbers mean one thing everywhere:

* **bytes** - the payload of the model's state dict: for a plain tensor ``numel *
  element_size``; for a torchao tensor subclass the sum over the plain tensors it is made of
  (packed data, scales, zero points). Shared storages (tied weights) count once. This is
  what a checkpoint holds, without file-format overhead.
* **perplexity** - ``exp(total next-token negative log-likelihood / predicted tokens)`` over
  all evaluation windows; each window predicts its tokens 2..L from their prefixes within
  the window. Computed from the logits with an explicit log-softmax in float32, not through
  the model's own loss, so the test can check it against ``model(labels=...)``.
* **latency** - greedy decoding of a fixed number of new tokens from the same prompts;
  milliseconds per generated token of one full pass over the prompts; warm-up passes are
  run first and excluded; the median over repeated passes is reported. The QuantizeJob uses
  :func:`served_latency`: the same decoding through the server's own engine and
  ``engine.compile`` plan, at batch 1 and 8, so its report predicts the server;
  :func:`latency` is plain eager ``generate()``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)


def tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor's data occupies, looking through torchao tensor subclasses."""
    import torch

    if type(tensor) is not torch.Tensor and type(tensor) is not torch.nn.Parameter and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def _storage_key(tensor: Any) -> Any:
    import torch

    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
    if hasattr(tensor, "__tensor_flatten__"):
        # A torchao tensor is its parts: a tied lm_head's state-dict entry is another wrapper
        # object around the same packed data, which must count once.
        names, _ = tensor.__tensor_flatten__()
        return tuple(_storage_key(getattr(tensor, n)) for n in names)
    return id(tensor)


def state_dict_bytes(model: Any) -> int:
    """Payload bytes of ``model.state_dict()``, shared tensors counted once."""
    seen: set[Any] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = _storage_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(tensor)
    return total


def linear_weight_bytes(model: Any, *, include_output_embeddings: bool = False) -> int:
    """Bytes of the weights of every ``nn.Linear`` (the layers quantization targets).

    The output embedding (``lm_head``) is left out by default: it is quantized only with
    ``quantizeEmbeddings`` (``embeddings.py``), and the whole-model figure is
    :func:`state_dict_bytes`.
    """
    import torch

    if include_output_embeddings:
        layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    else:
        layers = list(linear_layers(model).values())
    return sum(tensor_bytes(module.weight) for module in layers)


def linear_layers(model: Any) -> dict[str, Any]:
    """``name -> nn.Linear`` for every linear layer except the output embedding."""
    import torch

    skip = model.get_output_embeddings()
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not skip
    }


def unquantized_linear_layers(model: Any) -> list[str]:
    """Names of linear layers (output embedding excluded) whose weight is still a plain tensor.

    torchao leaves a layer alone when, e.g., the int4 group size does not divide its input
    width; the runner reports these so a skipped layer is never silent.
    """
    import torch

    return [
        name
        for name, module in linear_layers(model).items()
        if type(module.weight) in (torch.Tensor, torch.nn.Parameter)
    ]


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    """Total negative log-likelihood in nats."""
    tokens: int
    """Number of predicted tokens."""


def perplexity(model: Any, windows: Sequence[Any], *, batch_size: int = 8) -> PerplexityResult:
    """Perplexity of ``model`` over token windows (1-D LongTensors of length >= 2)."""
    import torch

    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    with torch.inference_mode():
        for batch in _batches_of_equal_length(windows, batch_size):
            ids = torch.stack(list(batch)).to(device)
            logits = model(input_ids=ids).logits[:, :-1, :].float()
            targets = ids[:, 1:]
            log_probs = torch.log_softmax(logits, dim=-1)
            nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            total_nll += float(nll.sum(dtype=torch.float64))
            total_tokens += targets.numel()
    if total_tokens == 0:
        raise ValueError("perplexity needs at least one window of two or more tokens")
    mean = total_nll / total_tokens
    return PerplexityResult(perplexity=math.exp(mean) if mean < 700 else math.inf, nll=total_nll, tokens=total_tokens)


def _batches_of_equal_length(windows: Iterable[Any], batch_size: int) -> Iterable[list[Any]]:
    # Windows are equal-length except possibly the last; batching only equal lengths
    # avoids padding, so no attention mask can change the numbers.
    batch: list[Any] = []
    for window in windows:
        if batch and (len(batch) == batch_size or len(batch[0]) != len(window)):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


@dataclass
class LatencyResult:
    ms_per_token: float
    """Median over passes of (pass wall time / generated tokens), in milliseconds."""
    runs_ms_per_token: list[float] = field(default_factory=list)
    prompts: int = 0
    new_tokens: int = 0
    warmup: int = 0


def latency(
    model: Any,
    prompts: Sequence[Any],
    *,
    new_tokens: int = 16,
    warmup: int = 1,
    repeats: int = 5,
    pad_token_id: int | None = None,
) -> LatencyResult:
    """Per-token greedy decoding latency of ``model`` over ``prompts`` (1-D LongTensors)."""
    import torch

    device = next(model.parameters()).device

    def one_pass() -> float:
        start = time.perf_counter()
        for prompt in prompts:
            ids = prompt.unsqueeze(0).to(device)
            # min_new_tokens: every pass decodes exactly the same number of tokens, even if
            # a model would emit EOS early - otherwise methods are timed on different work.
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_token_id,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000.0 / (len(prompts) * new_tokens)

    with torch.inference_mode():
        for _ in range(warmup):
            one_pass()
        runs = [one_pass() for _ in range(repeats)]
    return LatencyResult(
        ms_per_token=statistics.median(runs),
        runs_ms_per_token=runs,
        prompts=len(prompts),
        new_tokens=new_tokens,
        warmup=warmup,
    )


@dataclass
class ServedLatency:
    """Decode latency through the serving engine, per concurrent batch size."""

    path: str
    """The serving path measured (engine and :meth:`~kubeforge_runtime.serve.decode.DecodePlan.describe`)."""
    compile: str
    """The ``engine.compile`` setting the engine was built with (the server's default unless asked)."""
    compiled: bool = False
    """Whether that path compiled the forward or captured CUDA graphs (False: eager)."""
    batches: dict[int, LatencyResult] = field(default_factory=dict)
    """Batch size -> ms per generated token as one client sees it (wall time of the batch / new tokens)."""


def served_latency(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    compile: str | None = None,
    batch_sizes: Sequence[int] = (1,),
    new_tokens: int = 16,
    warmup: int = 1,
    repeats: int = 3,
) -> ServedLatency:
    """Per-token decoding latency of ``model`` through the server's own engine.

    The engine is built exactly as ``ServingRuntime.load`` builds it: the backend ``auto``
    picks (``serve.engine.select_backend``) and the ``engine.compile`` plan
    (``serve.decode.decode_plan``; default: the server's default setting), started and warmed
    up the same way, so compilation is excluded as it is before a server's ``/ready``. For
    each batch size ``b``, ``b`` copies of each prompt run concurrently, greedy, exactly
    ``new_tokens`` tokens each (no EOS stop); a pass is all prompts one after the other. The
    figure is the median over passes of wall time / ``new_tokens``, prefill included: the
    per-token latency a client of a server running ``b`` requests at once sees.
    """
    from ..serve.config import EngineConfig
    from ..serve.engine import EngineEvent, EngineRequest, create_engine, select_backend

    setting = compile if compile is not None else EngineConfig.model_fields["compile"].default
    longest = max(len(p) for p in prompts) + new_tokens + 1
    most = max(batch_sizes)
    config = EngineConfig.model_validate({"compile": setting, "maxConcurrentRequests": most, "maxModelLength": max(8, longest),
                                          "maxBatchTokens": max(16, most * longest), "maxQueuedRequests": most})
    backend, _why = select_backend("auto", model)
    engine = create_engine(backend, model, tokenizer, config, config.max_model_length or longest)
    engine.start()
    try:
        engine.warmup()

        async def run_prompt(batch: int, tag: str, ids: list[int]) -> None:
            # Submitted from an event loop, as the server does (the continuous engine delivers
            # its events on the submitting loop).
            loop = asyncio.get_running_loop()
            done = asyncio.Event()
            finished: list[EngineEvent] = []

            def note(ev: EngineEvent) -> None:
                finished.append(ev)
                if len(finished) == batch:
                    done.set()

            def sink(ev: EngineEvent) -> None:
                if ev.finished:
                    loop.call_soon_threadsafe(note, ev)

            for i in range(batch):
                engine.submit(EngineRequest(f"latency-{tag}-{i}", ids, new_tokens, [], temperature=0.0), sink)
            await asyncio.wait_for(done.wait(), 600)
            errors = [ev.error for ev in finished if ev.error]
            if errors:
                raise RuntimeError(f"latency pass at batch {batch} failed: {errors[0]}")

        async def timed_pass(batch: int, tag: str) -> float:
            start = time.perf_counter()
            for p, prompt in enumerate(prompts):
                await run_prompt(batch, f"{tag}-{p}", [int(t) for t in prompt])
            _sync(model)
            return (time.perf_counter() - start) * 1000.0 / (len(prompts) * new_tokens)

        def one_pass(batch: int, tag: str) -> float:
            return asyncio.run(timed_pass(batch, tag))

        plan = engine.plan
        result = ServedLatency(path=f"{engine.name} engine, {plan.describe()}", compile=setting,
                               compiled=plan.compile or plan.cuda_graphs)
        for batch in batch_sizes:
            for w in range(warmup):
                one_pass(batch, f"w{w}")
            runs = [one_pass(batch, f"r{r}") for r in range(repeats)]
            result.batches[batch] = LatencyResult(statistics.median(runs), runs, len(prompts), new_tokens, warmup)
        return result
    finally:
        engine.stop()


def _sync(model: Any) -> None:
    import torch

    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
