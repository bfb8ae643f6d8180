"""Merged projections (``train/merged.py``): the unmerged model's loss, logits and gradients.

The tiny Llama with its q/k/v and gate/up linears run as one GEMM each, against the stock
transformers model with the same weights: the loss and every parameter's gradient within
fp32 tolerance on packed text and on prompt-completion records, alone and with the fused
pieces (``train/fused.py``) swapped in too; with biases on the linears; state-dict keys
unchanged; and the layouts the merge must leave to the stock code (LoRA's wrapped linears,
ZeRO-3's emptied partitions, DTensor weights) are refused by :func:`merged.mergeable`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kubeforge_runtime import models
from kubeforge_runtime.train import fused, merged
from kubeforge_runtime.train.parallelize import CausalLMStage, target_positions
from kubeforge_runtime.train.trainer import TokenLoss
from train_support import record_batch, training_copies


def _pair(tiny_model: Path, bias: bool = False) -> tuple[nn.Module, nn.Module]:
    lms = training_copies(tiny_model)
    if bias:  # the same random biases on both copies' q/k/v and gate/up
        gen = torch.Generator().manual_seed(1)
        for a, b in zip(lms[0].modules(), lms[1].modules()):
            if isinstance(a, nn.Linear) and a is not lms[0].lm_head:
                for m in (a, b):
                    m.bias = nn.Parameter(torch.zeros(m.out_features))
                with torch.no_grad():
                    v = torch.randn(a.out_features, generator=gen) * 0.1
                    a.bias.copy_(v)
                    b.bias.copy_(v)
    return lms[0], lms[1]


def _loss(lm: nn.Module, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    at = target_positions(y, "cpu")
    return TokenLoss()(CausalLMStage(lm, True, True)(x, pos, at), y.flatten().index_select(0, at))


@pytest.mark.parametrize("fmt, packing, with_fused, bias", [
    ("text", True, False, False), ("prompt-completion", True, False, False),
    ("prompt-completion", False, False, False), ("text", True, True, False), ("text", True, False, True)])
def test_merged_model_gives_the_unmerged_loss_and_gradients(fmt: str, packing: bool, with_fused: bool, bias: bool,
                                                             tiny_model: Path) -> None:
    tok = models.load_tokenizer(str(tiny_model))
    x, y, pos = record_batch(tok, fmt, packing)
    stock, fast = _pair(tiny_model, bias)
    keys = list(fast.state_dict())
    if with_fused:
        fused.apply(fast)
    counts = merged.apply(fast, rotary=fused.apply_rotary if with_fused else None)
    layers = fast.config.num_hidden_layers
    assert counts == {"attention": layers, "mlp": layers}
    assert list(fast.state_dict()) == keys  # the model's own names: checkpoints and outputs unchanged
    want = _loss(stock, x, y, pos)
    want.backward()
    got = _loss(fast, x, y, pos)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in fast.named_parameters()}
    assert len(grads) == len(list(stock.parameters()))
    for name, p in stock.named_parameters():
        assert grads[name] is not None and grads[name].shape == p.shape, name
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # the merged linears' gradients are there and not zero (a split in the wrong place would swap them)
    layer = fast.model.layers[0]
    for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                layer.mlp.gate_proj, layer.mlp.up_proj):
        assert lin.weight.grad.abs().sum() > 0
    with torch.no_grad():  # logits too
        torch.testing.assert_close(CausalLMStage(fast, True, True)(x, pos), CausalLMStage(stock, True, True)(x, pos),
                                   rtol=1e-5, atol=1e-5)


def test_merged_linear_is_the_separate_linears() -> None:
    torch.manual_seed(0)
    lins = (nn.Linear(6, 4), nn.Linear(6, 2), nn.Linear(6, 3))
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    lins = tuple(lin.double() for lin in lins)
    for got, want in zip(merged.merged_linear(x, lins), (lin(x) for lin in lins)):
        torch.testing.assert_close(got, want)
    params = [p for lin in lins for p in lin.parameters()]
    assert torch.autograd.gradcheck(
        lambda xx, *ps: sum((o * (i + 1)).sum() for i, o in enumerate(merged.merged_linear(xx, lins))),
        (x.requires_grad_(), *params))


def test_swiglu_backward_is_the_derivative() -> None:
    torch.manual_seed(0)
    y = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)  # [gate | up], 6 each
    gate, up = y.detach().chunk(2, dim=-1)
    torch.testing.assert_close(merged.SwiGLUFunction.apply(y), torch.nn.functional.silu(gate) * up)
    assert torch.autograd.gradcheck(merged.SwiGLUFunction.apply, (y,))


def test_mergeable_refuses_what_must_take_the_stock_path(tiny_model: Path) -> None:
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False)
    assert merged.mergeable((a, b))
    assert not merged.mergeable((a, nn.Linear(4, 2, bias=True)))  # bias on one only
    assert not merged.mergeable((a, nn.Linear(4, 2, bias=False).double()))  # mixed dtypes

    class Wrapped(nn.Linear):  # peft's LoRA layers, QLoRA's NF4 linears: subclasses or wrappers
        pass

    assert not merged.mergeable((a, Wrapped(4, 2)))
    z = nn.Linear(4, 2, bias=False)  # a ZeRO-3 partition: emptied data, marked by DeepSpeed
    z.weight = nn.Parameter(torch.empty(0))
    assert not merged.mergeable((a, z))
    z = nn.Linear(4, 2, bias=False)
    z.weight.ds_id = 3
    assert not merged.mergeable((a, z))
    from peft import LoraConfig, get_peft_model

    lm = models.load_causal_lm(tiny_model, dtype=torch.float32)
    peft_model = get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    attn = peft_model.get_base_model().model.layers[0].self_attn
    assert not merged.mergeable((attn.q_proj, attn.k_proj, attn.v_proj))


def test_resolve() -> None:
    # auto: off until a whole step is measured faster (the benchmark's CPU step was level).
    assert merged.resolve("on", compiled=False)
    assert not merged.resolve("auto", compiled=False) and not merged.resolve("off", compiled=False)
    assert not merged.resolve("auto", compiled=True) and not merged.resolve("on", compiled=True)
