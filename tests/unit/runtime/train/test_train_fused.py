"""Fused training pieces (``train/fused.py``): the same outputs and gradients as the stock modules.

Each hand-written backward is checked by ``torch.autograd.gradcheck`` in float64 (finite
differences: a wrong sign, a missing term or a swapped half fails it), and the whole stage
with the pieces swapped in (RMSNorm, RoPE, the fused head and loss) against the stock
transformers model on the tiny model: the loss, the logits and every parameter's gradient
within fp32 tolerance, on packed text and on prompt-completion records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kubeforge_runtime import models
from kubeforge_runtime.train import fused
from kubeforge_runtime.train.parallelize import CausalLMStage, target_positions
from kubeforge_runtime.train.trainer import TokenLoss
from train_support import record_batch, training_copies


def test_rms_norm_backward_is_the_derivative() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fused.RMSNormFunction.apply(a, b, 1e-6), (x, w))


def test_rotary_backward_is_the_derivative() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 5, 4, 6, dtype=torch.float64).transpose(1, 2).requires_grad_()  # the layers' layout
    k = torch.randn(2, 5, 2, 6, dtype=torch.float64).transpose(1, 2).requires_grad_()
    # Different halves on purpose: the test must tell sin[:h] from sin[h:] (Llama's are equal).
    cos, sin = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: fused.apply_rotary(a, b, cos, sin), (q, k))
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    for got, want in zip(fused.apply_rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(got, want)


def test_linear_cross_entropy_is_the_summed_loss_and_its_derivative() -> None:
    torch.manual_seed(0)
    h = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([3, -100, 0, 10, 5, -100, 2])
    want = F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")
    for chunk in (1, 3, 7, 64):  # several chunks, one, and a chunk larger than the rows
        got = fused.LinearCrossEntropy.apply(h, w, y, chunk)
        torch.testing.assert_close(got, want)
        assert torch.autograd.gradcheck(lambda a, b, c=chunk: fused.LinearCrossEntropy.apply(a, b, y, c) * 1.5, (h, w))
    head = torch.nn.Linear(4, 11, bias=False)
    hf = h.detach().float()
    with torch.no_grad():  # validation: the loss alone, through the fused path (an fp32 head)
        torch.testing.assert_close(fused.head_loss(head, hf, y),
                                   F.cross_entropy(head(hf), y, ignore_index=-100, reduction="sum"))


def _stock_and_fused(tiny_model: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    lms = training_copies(tiny_model)
    keys = list(lms[1].state_dict())
    counts = fused.apply(lms[1])
    layers = lms[1].config.num_hidden_layers
    assert counts == {"rmsnorm": 2 * layers + 1, "rotary": layers}
    assert list(lms[1].state_dict()) == keys  # checkpoints stay interchangeable
    return lms[0], lms[1]


@pytest.mark.parametrize("fmt, packing", [("text", True), ("prompt-completion", True), ("prompt-completion", False)])
def test_fused_stage_gives_the_stock_loss_logits_and_gradients(fmt: str, packing: bool, tiny_model: Path) -> None:
    tok = models.load_tokenizer(str(tiny_model))
    x, y, pos = record_batch(tok, fmt, packing)
    stock, fast = _stock_and_fused(tiny_model)
    at = target_positions(y, "cpu")
    ya = y.flatten().index_select(0, at)
    want = TokenLoss()(CausalLMStage(stock, True, True)(x, pos, at), ya)
    want.backward()
    got = CausalLMStage(fast, True, True)(x, pos, at, ya)  # the fused head and loss
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in fast.named_parameters()}
    for name, p in stock.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert stock.lm_head.weight.grad.abs().sum() > 0 and stock.model.norm.weight.grad.abs().sum() > 0
    with torch.no_grad():  # without labels the fused model returns the stock logits
        torch.testing.assert_close(CausalLMStage(fast, True, True)(x, pos), CausalLMStage(stock, True, True)(x, pos),
                                   rtol=1e-5, atol=1e-5)


def test_resolve() -> None:
    # auto: off everywhere until measured faster (the benchmark's CPU step was not).
    assert not fused.resolve("auto", "cpu", compiled=False, fp32=True)
    assert not fused.resolve("auto", "cuda", compiled=False, fp32=True)
    assert fused.resolve("on", "cpu", compiled=False, fp32=True)
    assert not fused.resolve("on", "cpu", compiled=True, fp32=True)  # Inductor fuses compiled blocks itself
    assert not fused.resolve("on", "cpu", compiled=False, fp32=False)  # autocast keeps the stock modules
    assert fused.resolve("on", "cuda", compiled=False, fp32=True)
    assert not fused.resolve("off", "cpu", compiled=False, fp32=True)
    # Never where they are invalid, even when asked for (fused.py says why).
    assert not fused.resolve("on", "cpu", compiled=False, fp32=True, qlora=True)
    assert not fused.resolve("on", "cpu", compiled=False, fp32=True, distillation=True)
    assert not fused.resolve("auto", "cpu", compiled=False, fp32=True, distillation=True)
