"""Logits at the target positions only (``CausalLMStage(targets_at=...)``): same loss, same gradients.

The trainer asks its last stage for logits only where a label is not -100 (``parallelize.
target_positions``); the final norm, ``lm_head`` and the cross-entropy then skip prompts,
padding and the first token of every packed record. These tests compare that against a plain
full-logit computation - the transformers model's own forward at every position, then the
cross-entropy with ``ignore_index`` - on the tiny model: the loss and every parameter's
gradient must agree, on packed text and on prompt-completion records (most positions
without a target), and a micro-batch without any target must give a zero loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kubeforge_runtime import data as D
from kubeforge_runtime import models
from kubeforge_runtime.train.parallelize import CausalLMStage, target_positions
from kubeforge_runtime.train.trainer import TokenLoss
from train_support import record_batch


def _full_logit_loss_and_grads(lm: torch.nn.Module, x, y, pos) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The plain way: the model's own forward (logits at every position), then cross-entropy."""
    lm.zero_grad(set_to_none=True)
    logits = lm(input_ids=x, position_ids=pos).logits
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=D.IGNORE_INDEX, reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}


def _target_logit_loss_and_grads(lm: torch.nn.Module, x, y, pos) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The trainer's way: the stage with ``targets_at``, the trainer's TokenLoss."""
    lm.zero_grad(set_to_none=True)
    at = target_positions(y, "cpu")
    logits = CausalLMStage(lm, True, True)(x, pos, at)
    loss = TokenLoss()(logits, y.flatten().index_select(0, at))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}, logits.shape[0]


@pytest.mark.parametrize("fmt, packing", [("text", True), ("prompt-completion", True), ("prompt-completion", False)])
def test_target_logits_give_the_full_logit_loss_and_gradients(fmt: str, packing: bool, tiny_model: Path) -> None:
    tok = models.load_tokenizer(str(tiny_model))
    x, y, pos = record_batch(tok, fmt, packing)
    targets = int((y != D.IGNORE_INDEX).sum())
    assert 0 < targets < y.numel()  # some positions have no target: the lever has work to skip
    lm = models.load_causal_lm(tiny_model, dtype=torch.float32).train()
    lm.config.use_cache = False
    full_loss, full_grads = _full_logit_loss_and_grads(lm, x, y, pos)
    loss, grads, rows = _target_logit_loss_and_grads(lm, x, y, pos)
    assert rows == targets  # the head ran on the target positions only
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == full_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, full_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert full_grads["lm_head.weight"].abs().sum() > 0  # a real gradient, not two zeros


def test_a_micro_batch_without_targets_has_zero_loss_and_gradients(tiny_model: Path) -> None:
    tok = models.load_tokenizer(str(tiny_model))
    x, y, pos = record_batch(tok, "text", True)
    y = torch.full_like(y, D.IGNORE_INDEX)
    lm = models.load_causal_lm(tiny_model, dtype=torch.float32).train()
    loss, grads, rows = _target_logit_loss_and_grads(lm, x, y, pos)
    assert rows == 0 and float(loss) == 0.0
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())
