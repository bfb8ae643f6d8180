"""LoRA adapters served from one copy of the base model's weights.

Called by :meth:`.service.ServingRuntime.load` for each ``adapters[]`` entry. Each adapter
gets its own engine (its own batch and KV cache), and the engines drive a plain
``*ForCausalLM`` module, so an adapter needs a module tree of its own; what it must not need
is a copy of the base weights. :func:`shared_base_view` builds that tree with
``copy.deepcopy`` and a memo that maps every parameter and buffer of the base to itself:
modules, configs and hooks are copied, tensors are the very same objects. peft then injects
the adapter's LoRA layers into that tree, unmerged (``y = W x + s * B A x``), each wrapping
the shared base layer. Extra memory per adapter: its LoRA matrices (plus its engine's KV
cache, sized like the base model's), measured by :func:`unique_tensor_bytes`.

Unmerged LoRA costs two thin matmuls per adapted layer per step; merging would need a
private copy of every adapted weight matrix, which is what this module exists to avoid.
Nothing writes to the shared tensors: peft's loading only adds the LoRA parameters, and
the engines run under ``inference_mode``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def shared_base_view(base: Any) -> Any:
    """A deep copy of ``base``'s module tree whose parameters and buffers are ``base``'s own tensors."""
    memo: dict[int, Any] = {}
    for tensor in [*base.parameters(), *base.buffers()]:
        memo[id(tensor)] = tensor
    return copy.deepcopy(base, memo)


def attach_adapter(base: Any, path: str | Path, name: str) -> Any:
    """``base`` with the LoRA adapter in ``path`` on top, unmerged, sharing ``base``'s weights.

    Returns the ``*ForCausalLM`` module (not the ``PeftModel`` wrapper): the engines call its
    ``forward`` and the continuous engine its ``init_continuous_batching``.
    """
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(shared_base_view(base), str(path), adapter_name=name)
    model = peft_model.get_base_model().eval()
    copied = shared_tensor_bytes(base, model)
    if copied < unique_tensor_bytes([base]):
        # Should not happen (the memo covers every registered tensor); say so rather than serve double.
        log.warning("adapter %s shares only %d of the base model's %d weight bytes", name, copied,
                    unique_tensor_bytes([base]))
    return model


def _leaf_tensors(tensor: Any) -> Iterator[Any]:
    """The plain tensors holding a (possibly subclassed, e.g. torchao-quantized) tensor's data."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor).__name__ not in ("Tensor", "Parameter"):
        names, _ = tensor.__tensor_flatten__()
        for attr in names:
            yield from _leaf_tensors(getattr(tensor, attr))
        return
    yield tensor


def _storages(modules: Iterable[Any]) -> dict[tuple[str, int], int]:
    """(device, storage address) -> bytes of every storage the modules' parameters and buffers use."""
    out: dict[tuple[str, int], int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            for leaf in _leaf_tensors(tensor):
                try:
                    storage = leaf.untyped_storage()
                    out[(str(leaf.device), storage.data_ptr())] = storage.nbytes()
                except (RuntimeError, NotImplementedError):  # a storage-less subclass: count the tensor itself
                    out[(str(leaf.device), id(leaf))] = leaf.numel() * leaf.element_size()
    return out


def unique_tensor_bytes(modules: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind the modules' parameters and buffers (shared ones once)."""
    return sum(_storages(modules).values())


def shared_tensor_bytes(a: Any, b: Any) -> int:
    """Bytes of the storages that modules ``a`` and ``b`` both use."""
    sa, sb = _storages([a]), _storages([b])
    return sum(n for key, n in sa.items() if key in sb)


def weight_bytes(models: dict[str, Any], base_name: str) -> dict[str, int]:
    """What each served model adds to the process's weight memory: the base its distinct
    storages, each adapter the storages the base does not have (its LoRA matrices)."""
    base = _storages([models[base_name]])
    out = {base_name: sum(base.values())}
    for name, model in models.items():
        if name != base_name:
            out[name] = sum(n for key, n in _storages([model]).items() if key not in base)
    return out
