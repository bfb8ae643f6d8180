"""bf16 on a CPU without native bf16 kernels: fp32 compute from bf16 storage (``train/precision.py``)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from train_support import LORA_ALL, STEPS, Run
from torch import nn

from kubeforge_runtime.train import precision


def test_upcast_linear_equals_fp32_linear_and_saves_only_the_stored_weight() -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 16).to(torch.bfloat16)
    b = torch.randn(24).to(torch.bfloat16)
    x = torch.randn(3, 16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = precision.UpcastLinear.apply(x, w, b)
    assert y.dtype == torch.float32
    assert [t.dtype for t in saved] == [torch.bfloat16], "only the bf16 weight may be kept for backward"
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    ref = nn.functional.linear(x2, w.float(), b.float())
    ref.backward(g)
    assert torch.equal(y, ref)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)


def test_upcast_frozen_model_trains_as_its_fp32_copy() -> None:
    """A tiny Llama with a bf16 frozen base and fp32 LoRA adapters, patched, gives the
    logits and adapter gradients of the same model with its bf16 weights copied to fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)

    def build(dtype: torch.dtype) -> nn.Module:
        torch.manual_seed(0)
        lm = LlamaForCausalLM(cfg).to(torch.bfloat16).to(dtype)  # same bf16-rounded values
        peft = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, p in peft.named_parameters():
            if ".lora_" in name:
                p.data = p.data.float()
                nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        return peft

    low, ref = build(torch.bfloat16), build(torch.float32)
    changed = precision.upcast_frozen(low)
    # 2 layers x 7 linears + the embedding; lm_head is tied to it and a linear too
    assert changed == 2 * 7 + 2
    assert all(p.dtype == torch.bfloat16 for n, p in low.named_parameters() if ".lora_" not in n)
    ids = torch.randint(0, 96, (2, 7))
    out, want = low(input_ids=ids).logits, ref(input_ids=ids).logits
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    want.square().mean().backward()
    grads = {n: p.grad for n, p in low.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)


def test_policy_by_precision_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv(precision.ENV_CPU_BF16, raising=False)
    assert not precision.computes_fp32("fp32", cpu)
    assert precision.computes_fp32("bf16", cpu) == (not torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert not precision.computes_fp32("bf16", torch.device("cuda"))
    monkeypatch.setenv(precision.ENV_CPU_BF16, "autocast")
    assert not precision.computes_fp32("bf16", cpu)


@pytest.mark.torchrun
def test_trainer_runs_bf16_as_fp32_compute_on_this_cpu(launcher: Callable[..., Run]) -> None:
    """The trainer applies the policy: on a CPU without native bf16 a bf16 LoRA run says so
    and computes what the autocast-free fp32 math gives; with native bf16 it keeps autocast."""
    lora = {"method": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": LORA_ALL},
            "training": {"precision": "bf16", "maxGradNorm": 0}, "output": {"format": "adapter"}}
    run = launcher("bf16-lora-cpu-policy", lora)
    switched = "computing in fp32 from the stored weights" in run.log()
    assert switched == (not torch.ops.mkldnn._is_mkldnn_bf16_supported())
    losses = run.dump()["losses"]
    assert len(losses) == STEPS and losses[-1] < losses[0]
