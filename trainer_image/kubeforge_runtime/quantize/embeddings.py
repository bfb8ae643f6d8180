"""int8 input embedding and output embedding (``lm_head``): the part of a small model that
linear-layer quantization leaves in full precision.

Called by :mod:`.methods` (while quantizing) and by :func:`kubeforge_runtime.models.load_causal_lm`
(before loading a quantized output). On SmolLM2-135M the tied embedding is 28 M of the 135 M
parameters: with only the linear layers in int8 the whole model is 0.41x of fp32; with the
embedding in int8 too it is about 0.30x.

How: torchao's ``Int8WeightOnlyConfig`` (one symmetric scale per row) applied to the
``nn.Embedding``; a tied ``lm_head`` is pointed at the same quantized tensor (one copy, as in
the source), an untied one is quantized as a linear layer with the same config. transformers'
own ``TorchAoConfig(include_input_output_embeddings=True)`` does not quantize a *tied*
embedding (it is loaded once, as the output embedding), so this is done after loading.

Two operator registrations for torchao's ``Int8Tensor``, made through torchao's own extension
table (``Int8Tensor.implements``), replace behaviour that would defeat the purpose:

* ``aten.embedding``: torchao 0.18 dequantizes the *whole* table for every lookup (about
  150 ms per decode step for a 49152 x 576 table on 2 CPU cores); a row-wise scale allows
  gathering the int8 rows and their scales first, so a lookup costs what it reads;
* ``aten.equal``: transformers compares tied parameters when it reloads a checkpoint, and
  torchao 0.18 has no ``equal`` for ``Int8Tensor``.

:func:`register_ops` is idempotent and cheap; importing torchao happens inside it.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_registered = False


def register_ops() -> None:
    """Register the row-gather embedding and ``equal`` for torchao's ``Int8Tensor`` (once)."""
    global _registered
    if _registered:
        return
    import torch
    from torchao.quantization import Int8Tensor

    aten = torch.ops.aten

    @Int8Tensor.implements(aten.embedding.default)
    def _embedding(func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        weight, indices = args[0], args[1]
        rows, cols = weight.qdata.shape
        if list(weight.block_size) != [1, cols]:  # not one scale per row: the generic path
            return aten.embedding.default(weight.dequantize(), indices, *args[2:], **kwargs)
        q = aten.embedding.default(weight.qdata, indices)
        scale = aten.embedding.default(weight.scale.reshape(rows, 1), indices)
        values = q.to(weight.dtype)
        if weight.zero_point is not None:
            values = values - aten.embedding.default(weight.zero_point.reshape(rows, 1), indices).to(weight.dtype)
        return values * scale.to(weight.dtype)

    @Int8Tensor.implements(aten.equal.default)
    def _equal(func: Any, types: Any, args: Any, kwargs: Any) -> bool:
        a, b = args[0], args[1]
        if not (isinstance(a, Int8Tensor) and isinstance(b, Int8Tensor)):
            return False
        if list(a.block_size) != list(b.block_size) or a.shape != b.shape:
            return False
        same_zero = (a.zero_point is None) == (b.zero_point is None) and (
            a.zero_point is None or torch.equal(a.zero_point, b.zero_point)
        )
        return bool(torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale) and same_zero)

    _registered = True


def embedding_config() -> Any:
    """The torchao config used for embeddings: int8 weight-only, one scale per row."""
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def is_quantized(weight: Any) -> bool:
    """Whether ``weight`` is a torchao tensor subclass (not a plain tensor)."""
    import torch

    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def quantize_embeddings(model: Any) -> dict[str, Any]:
    """Quantize ``model``'s input and output embeddings to int8 in place; return what was done.

    A tied ``lm_head`` shares the quantized table (the model stays tied); an untied one is
    quantized on its own. Already quantized weights are left as they are.
    """
    import torch
    from torchao.quantization import quantize_

    register_ops()
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    if not is_quantized(emb.weight):
        quantize_(emb, embedding_config(), filter_fn=lambda module, _name: isinstance(module, torch.nn.Embedding))
    if head is not None:
        if tied:
            head.weight = emb.weight
        elif not is_quantized(head.weight):
            quantize_(head, embedding_config(), filter_fn=lambda module, _name: isinstance(module, torch.nn.Linear))
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and hasattr(qc, "include_input_output_embeddings"):
        # Saved into config.json: on reload transformers then expects quantized embeddings.
        qc.include_input_output_embeddings = True
    return {"embeddings": "int8-weight-only", "tiedOutputEmbedding": tied}


def embeddings_quantized(model: Any) -> bool:
    """Whether the input embedding (and the output embedding, if any) are quantized."""
    head = model.get_output_embeddings()
    return is_quantized(model.get_input_embeddings().weight) and (head is None or is_quantized(head.weight))


def drop_tied_duplicate(model: Any, out_dir: Any) -> bool:
    """Remove the second copy of a tied, quantized output embedding from ``model.safetensors``.

    transformers drops a tied ``lm_head.weight`` before saving by comparing storages, which it
    cannot do for the flattened parts of a torchao tensor (``lm_head._weight_qdata``...), so
    the table would be written twice (28 MB more on SmolLM2-135M). On reload transformers
    ties ``lm_head`` to the input embedding again (``tie_word_embeddings``), as for any tied
    checkpoint. Returns whether the file was rewritten.
    """
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    head = model.get_output_embeddings()
    if head is None or head.weight is not model.get_input_embeddings().weight or not is_quantized(head.weight):
        return False
    path = Path(out_dir) / "model.safetensors"
    if not path.exists():  # sharded or another format: leave it as transformers wrote it
        return False
    names = [name for name, module in model.named_modules() if module is head]
    prefixes = tuple(f"{name}." for name in names)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        keep = {key: handle.get_tensor(key) for key in handle.keys() if not key.startswith(prefixes)}
        dropped = len(list(handle.keys())) - len(keep)
    if not dropped:
        return False
    for name in names:
        metadata.pop(f"{name}.weight", None)
    if "tensor_names" in metadata:
        listed = json.loads(metadata["tensor_names"])
        metadata["tensor_names"] = json.dumps([n for n in listed if not n.startswith(prefixes)])
    save_file(keep, str(path), metadata=metadata)
    return True
