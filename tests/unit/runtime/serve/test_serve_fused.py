"""``serve/fused.py``: q/k/v and gate/up as one matmul each, RMSNorm as one call.

The merged model must give the stock model's logits and greedy tokens, run four linears per
layer instead of seven, keep its weights' memory (each projection a view of the merged rows),
and leave LoRA-wrapped and quantized projections alone. End to end the continuous engine
(which installs it) is compared with ``generate()`` in ``test_serve_batching.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kubeforge_runtime.serve import fused


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _count_linears(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    linear = F.linear

    def counting(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(weight.shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", counting)
    monkeypatch.setattr(fused.F, "linear", counting)
    return calls


def test_merged_model_gives_the_same_logits_and_tokens_with_fewer_matmuls(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stock, model = _model(tiny_model), _model(tiny_model)
    layers = model.config.num_hidden_layers
    storage_before = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p for p in model.parameters()}.values())
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert fused.install(model) == {"qkv": layers, "gate_up": layers}
    assert fused.install(model) == {"qkv": 0, "gate_up": 0}  # once
    assert fused.install_rms_norm(model) == 2 * layers + 1
    attn = model.model.layers[0].self_attn
    # Each projection is a view of the merged rows: same values, no second copy of the weights.
    assert torch.equal(attn.q_proj.weight, q)
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    storage_after = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p for p in model.parameters()}.values())
    assert storage_after == storage_before

    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    calls = _count_linears(monkeypatch)
    with torch.inference_mode():
        want = stock(ids).logits
        stock_calls = len(calls)
        calls.clear()
        got = model(ids).logits
    assert stock_calls == 7 * layers + 1  # the stock path: seven per layer plus lm_head
    assert len(calls) == 4 * layers + 1  # merged: qkv, o, gate_up, down
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    with torch.inference_mode():
        want_tokens = stock.generate(ids, max_new_tokens=12, do_sample=False)
        got_tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got_tokens, want_tokens)


def test_a_projection_called_on_another_input_computes_its_own(tiny_model: Path) -> None:
    model = _model(tiny_model)
    attn = model.model.layers[0].self_attn
    k_weight = attn.k_proj.weight.detach().clone()
    fused.install(model)
    x, other = torch.randn(1, 3, model.config.hidden_size), torch.randn(1, 3, model.config.hidden_size)
    with torch.inference_mode():
        attn.q_proj(x)
        torch.testing.assert_close(attn.k_proj(other), other @ k_weight.T)  # not x's slice
        torch.testing.assert_close(attn.k_proj(x), x @ k_weight.T)  # x's slice
        torch.testing.assert_close(attn.k_proj(x), x @ k_weight.T)  # again: its own matmul


def test_lora_wrapped_projections_keep_their_own_forward(tiny_model: Path, tiny_adapter: Path) -> None:
    from peft import PeftModel

    from kubeforge_runtime.serve.adapters import attach_adapter

    base = _model(tiny_model)
    adapted = attach_adapter(base, tiny_adapter, "a")
    merged_reference = PeftModel.from_pretrained(_model(tiny_model), str(tiny_adapter)).merge_and_unload().eval()
    layers = base.config.num_hidden_layers
    assert fused.install(base) == {"qkv": layers, "gate_up": layers}
    # The adapter wraps q_proj and v_proj (and down_proj): its q/k/v stay separate; its gate/up
    # are merged on the base's merged storage (shared, not copied again).
    assert fused.install(adapted) == {"qkv": 0, "gate_up": layers}
    mlp, base_mlp = adapted.model.layers[0].mlp, base.model.layers[0].mlp
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == base_mlp.gate_proj.weight.untyped_storage().data_ptr()
    ids = torch.randint(3, base.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(adapted(ids).logits, merged_reference(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(adapted(ids).logits, base(ids).logits, atol=1e-4)  # the adapter counts


def test_quantized_projections_are_left_alone(tiny_quantized: Path) -> None:
    from kubeforge_runtime import models as model_io

    model = model_io.load_causal_lm(str(tiny_quantized), device="cpu").eval()
    assert fused.install(model) == {"qkv": 0, "gate_up": 0}
