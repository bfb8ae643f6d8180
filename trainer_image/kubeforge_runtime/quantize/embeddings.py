"""int8 input embedding and output embedding (``lm_head``): the part of a small model that
linear-layer quantization leaves in full precision.

Called by :mod:`.methods` (while quantizing) and by :func:`kubeforge_runtime.models.load_causal_lm`
(before loading a quantized output). On SmolLM2-135M the tied embedding is 28 M of the 135 M
parameters: with only the linear layers in int8 the whole model is 0.41x of fp32; with the
embedding in int8 too it is about 0.30x.

How: torchao's ``Int8WeightOnlyConfig(granularity=PerGroup(32))`` (one symmetric fp32 scale per
32 consecutive values of a row; one per row where 32 does not divide the width) applied to the
``nn.Embedding``; a tied ``lm_head`` is pointed at the same quantized tensor (one copy, as in
the source), an untied one is quantized as a linear layer with the same config.

Why groups, not one scale per row: the table is also the tied ``lm_head``, and a few hidden
dimensions carry values 3-4x the typical row's largest (SmolLM2-135M: column maxima up to 1.96
against a median of 0.55), so one scale per row spends most of int8's range on them. Measured on
the main job's fine-tuned SmolLM2-135M (README "Quantization"): int8-weight-only with per-row
embeddings +1.35 % perplexity and -2 accuracy points; the relative error of the table is 1.17 %
per row, 0.61 % in groups of 64 and 0 in groups of 32 (that model's table came from a GGUF file
whose Q8_0 blocks are exactly 32 symmetric int8 values, so groups of 32 reproduce it). The
scales cost 5 bytes per 32 values (fp32 scale, int8 zero point): 0.8 % of the fp32 model. transformers'
own ``TorchAoConfig(include_input_output_embeddings=True)`` does not quantize a *tied*
embedding (it is loaded once, as the output embedding), so this is done after loading.

Two operator registrations for torchao's ``Int8Tensor``, made through torchao's own extension
table (``Int8Tensor.implements``), replace behaviour that would defeat the purpose:

* ``aten.embedding``: torchao 0.18 dequantizes the *whole* table for every lookup (about
  150 ms per decode step for a 49152 x 576 table on 2 CPU cores); scales per row or per group
  of a row allow gathering the int8 rows and their scales first, so a lookup costs what it
  reads (outputs saved with one scale per row, before groups, load and look up the same way);
* ``aten.equal``: transformers compares tied parameters when it reloads a checkpoint, and
  torchao 0.18 has no ``equal`` for ``Int8Tensor``;
* ``F.linear`` / ``aten.linear`` (weight-only, CPU): torchao 0.18 builds the whole
  full-precision weight before every multiply (a grouped ``lm_head`` of 49152 x 576 took 17x
  fp32's time per call); :mod:`.int8_linear` widens and scales it a cache-sized block of rows
  at a time instead. Every other case is passed on to torchao's own implementation.

:func:`register_ops` is idempotent and cheap; importing torchao happens inside it.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_registered = False


def register_ops() -> None:
    """Register the row-gather embedding, ``equal`` and the blockwise weight-only ``linear``
    for torchao's ``Int8Tensor`` (once)."""
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
        block_rows, group = weight.block_size
        if block_rows != 1 or cols % group:  # not row-wise or row-group-wise scales: the generic path
            return aten.embedding.default(weight.dequantize(), indices, *args[2:], **kwargs)
        groups = cols // group  # 1 for one scale per row
        q = aten.embedding.default(weight.qdata, indices)
        scale = aten.embedding.default(weight.scale.reshape(rows, groups), indices)
        values = q.to(weight.dtype).unflatten(-1, (groups, group))
        if weight.zero_point is not None:
            zero = aten.embedding.default(weight.zero_point.reshape(rows, groups), indices)
            values = values - zero.to(weight.dtype).unsqueeze(-1)
        return (values * scale.to(weight.dtype).unsqueeze(-1)).flatten(-2)

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

    _register_linear(Int8Tensor)
    _registered = True


def _register_linear(int8_tensor: Any) -> None:
    """Route ``Int8Tensor``'s weight-only CPU linear to :mod:`.int8_linear`, keeping torchao's
    implementation (read from its tables before replacing it) for everything else."""
    import torch

    from . import int8_linear

    aten_linear, fn_linear = torch.ops.aten.linear.default, torch.nn.functional.linear
    original_aten = int8_tensor._ATEN_OP_TABLE[int8_tensor][aten_linear]
    original_fn = int8_tensor._TORCH_FN_TABLE[int8_tensor][fn_linear]

    def route(original: Any) -> Any:
        def _linear(func: Any, types: Any, args: Any, kwargs: Any) -> Any:
            activation, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if int8_linear.handles(activation, weight):
                return int8_linear.linear(activation, weight, bias)
            return original(func, types, args, kwargs)

        return _linear

    int8_tensor.implements(aten_linear)(route(original_aten))
    int8_tensor.implements_torch_function(fn_linear)(route(original_fn))


GROUP_SIZE = 32
"""Values of a row sharing one int8 scale in the embedding / ``lm_head``."""


def embedding_config(width: int) -> Any:
    """The torchao config for an embedding table ``width`` values wide: int8 weight-only, one
    scale per :data:`GROUP_SIZE` values, or one per row where :data:`GROUP_SIZE` does not divide
    ``width``."""
    from torchao.quantization import Int8WeightOnlyConfig, PerGroup, PerRow

    return Int8WeightOnlyConfig(granularity=PerGroup(GROUP_SIZE) if width % GROUP_SIZE == 0 else PerRow())


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
        quantize_(emb, embedding_config(emb.weight.shape[-1]),
                  filter_fn=lambda module, _name: isinstance(module, torch.nn.Embedding))
    if head is not None:
        if tied:
            head.weight = emb.weight
        elif not is_quantized(head.weight):
            quantize_(head, embedding_config(head.weight.shape[-1]),
                      filter_fn=lambda module, _name: isinstance(module, torch.nn.Linear))
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and hasattr(qc, "include_input_output_embeddings"):
        # Saved into config.json: on reload transformers then expects quantized embeddings.
        qc.include_input_output_embeddings = True
    return {**facts(model), "tiedOutputEmbedding": tied}


def embeddings_quantized(model: Any) -> bool:
    """Whether the input embedding (and the output embedding, if any) are quantized."""
    head = model.get_output_embeddings()
    return is_quantized(model.get_input_embeddings().weight) and (head is None or is_quantized(head.weight))


def facts(model: Any) -> dict[str, Any]:
    """What the output's lineage says of the embeddings: full precision, or int8 with the
    number of values sharing a scale (the row width where there is one scale per row)."""
    if not embeddings_quantized(model):
        return {"embeddings": "full precision"}
    return {"embeddings": "int8-weight-only",
            "embeddingGroupSize": int(model.get_input_embeddings().weight.block_size[-1])}


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
