"""Parallelisation plans: tensor parallel and pipeline stages for a causal LM.

Called by the trainer (``trainer.py``) after the model is loaded (and LoRA applied). Kept
apart from the training loop, torchtitan-style:

* :func:`apply_tensor_parallel` - DTensor tensor parallelism on the decoder layers. The plan
  is the model's own ``base_model_tp_plan`` from transformers (Llama-family models carry one:
  q/k/v/gate/up column-wise, o/down row-wise) or the built-in Llama plan when a model has
  none. peft LoRA layers are split consistently: a column-wise layer shards its base weight
  and ``lora_B`` by output rows (``lora_A`` replicated); a row-wise layer shards its base
  weight and ``lora_A`` by input columns (``lora_B`` replicated). Embeddings, norms and
  ``lm_head`` stay replicated, so the logits (and the loss) are whole on every TP rank.
* :func:`prune_to_stage` + :class:`CausalLMStage` - a pipeline stage is the model with the
  other stages' decoder layers removed (the layer list becomes a ModuleDict keyed by the
  original index), so parameter names are identical in every layout and checkpoints reshard
  freely between layouts.

Data parallelism (FSDP2, DDP, DeepSpeed ZeRO) is applied afterwards by the run's
data-parallel strategy (``strategy.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .config import ConfigError

log = logging.getLogger(__name__)

LLAMA_TP_PLAN: dict[str, str] = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}


def decoder(lm: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``) inside a ``*ForCausalLM``."""
    inner = getattr(lm, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ConfigError(f"{type(lm).__name__}: expected a decoder-only model with .model.layers (Llama-family)")
    return inner


def layer_items(lm: nn.Module) -> list[tuple[str, nn.Module]]:
    """(original index, layer) pairs of the decoder layers this rank holds."""
    layers = decoder(lm).layers
    if isinstance(layers, nn.ModuleDict):
        return list(layers.items())
    return [(str(i), layer) for i, layer in enumerate(layers)]


def tp_plan_for(lm: nn.Module) -> dict[str, str]:
    """The tensor-parallel plan: the model's own transformers plan, else the Llama plan."""
    plan = getattr(lm.config, "base_model_tp_plan", None) or LLAMA_TP_PLAN
    unsupported = {k: v for k, v in plan.items() if v not in ("colwise", "rowwise")}
    if unsupported:
        raise ConfigError(
            f"parallelism.tensor: {type(lm).__name__}'s tensor-parallel plan uses styles this runtime "
            f"does not apply ({unsupported}); use tensor: 1 for this model"
        )
    return dict(plan)


def apply_tensor_parallel(lm: nn.Module, tp_mesh: Any) -> None:
    """Shard the decoder layers' linear layers over ``tp_mesh`` (in place)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = tp_plan_for(lm)
    for _, layer in layer_items(lm):
        for pattern, style in plan.items():
            prefix, _, suffix = pattern.partition("layers.*.")
            if prefix or not suffix:
                raise ConfigError(f"unsupported tensor-parallel plan entry {pattern!r}")
            module = layer.get_submodule(suffix)
            sub_plan: dict[str, Any]
            if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
                # A peft LoRA layer: split the adapter so its output lines up with the base's.
                if style == "colwise":
                    sub_plan = {"base_layer": ColwiseParallel()}
                    sub_plan.update({f"lora_B.{name}": ColwiseParallel() for name in module.lora_B})
                else:
                    sub_plan = {"base_layer": RowwiseParallel()}
                    sub_plan.update({f"lora_A.{name}": RowwiseParallel() for name in module.lora_A})
                parallelize_module(module, tp_mesh, sub_plan)
            else:
                parallelize_module(layer, tp_mesh, {suffix: ColwiseParallel() if style == "colwise" else RowwiseParallel()})
    log.info("tensor parallel over %d ranks: %d plan entries", tp_mesh.size(), len(plan))


def prune_to_stage(lm: nn.Module, layers: range, is_first: bool, is_last: bool) -> None:
    """Keep only this pipeline stage's parts of ``lm`` (in place), names unchanged."""
    dec = decoder(lm)
    kept = nn.ModuleDict({idx: layer for idx, layer in layer_items(lm) if int(idx) in layers})
    dec.layers = kept
    if not is_first:
        dec.embed_tokens = None
    if not is_last:
        dec.norm = None
        lm.lm_head = None


class CausalLMStage(nn.Module):
    """Forward of one pipeline stage of a Hugging Face decoder-only causal LM.

    The first stage takes token ids, the others hidden states; the last stage returns
    logits. With a single stage this is the whole model (ids -> logits), and every layout
    uses this same forward, so they compute the same thing. Attention is causal with no
    padding mask: samples are right-padded and padding is never a target (see data.py).
    ``position_ids`` (every stage gets them) restart at each packed record, which makes
    attention document-causal: packed records do not attend to each other. How the record
    boundaries reach the kernel (varlen lengths, a flex block mask, or a dense mask) depends
    on the attention implementation (``attention.py``).

    ``targets_at`` (last stage only): flat indices into the (batch x sequence) positions that
    have a target (:func:`target_positions`). The final norm and ``lm_head`` then run on those
    positions only and the result is ``(len(targets_at), vocab)`` logits, one row per target
    in row-major order. No target's logit changes (the head works position by position), so
    neither do the loss and the gradients; positions without a target (prompts, the first
    token of every packed record, padding) cost no head and no cross-entropy. Without it the
    stage returns ``(batch, sequence, vocab)`` logits at every position.

    ``labels`` (last stage only; the labels of those positions, or of every position): the
    stage returns the summed token cross-entropy instead of logits, the head and the loss
    fused (``fused.head_loss``: no whole logits tensor is held). Only where the head's weight
    is whole and plain in the forward (the trainer decides: ``Trainer._fused_head``).
    """

    def __init__(self, lm: nn.Module, is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.lm = lm
        self.is_first = is_first
        self.is_last = is_last
        self.documents = True
        """``sdpa`` on packed rows: record by record (``attention.Documents``); False: the dense
        block-diagonal mask (the fallback, for comparisons)."""

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                targets_at: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        from .attention import stage_mask

        dec = decoder(self.lm)
        h = dec.embed_tokens(x) if self.is_first else x
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = stage_mask(dec.config, h, position_ids, documents=self.documents)
        position_embeddings = dec.rotary_emb(h, position_ids=position_ids)
        for _, layer in layer_items(self.lm):
            h = layer(h, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids)
            if isinstance(h, tuple):  # older transformers return (hidden,)
                h = h[0]
        if self.is_last:
            if targets_at is not None:
                h = h.flatten(0, 1).index_select(0, targets_at)
            if labels is not None:  # the summed token loss, head and loss fused (fused.head_loss)
                from .fused import head_loss

                h = dec.norm(h)
                return head_loss(self.lm.lm_head, h.reshape(-1, h.shape[-1]), labels.reshape(-1))
            return self.lm.lm_head(dec.norm(h))
        return h


def target_positions(labels: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The flat indices of the positions of ``labels`` (shifted, shape (batch, sequence)) that
    have a target, on ``device``: :class:`CausalLMStage`'s ``targets_at``. Computed where the
    labels are (the CPU copy, before the step moves them) so that a GPU never waits for them."""
    from ..data import IGNORE_INDEX

    return (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1).to(device, non_blocking=True)
