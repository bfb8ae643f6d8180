"""The blockwise int8 weight-only linear (``quantize/int8_linear.py``) against torchao's own
dequantize-then-multiply, and that a quantized model actually runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubeforge_runtime.quantize import embeddings, int8_linear
from kubeforge_runtime.quantize.methods import get_method


def _int8_linear(rows: int, width: int, granularity: Any, dtype: torch.dtype = torch.float32,
                 bias: bool = False, mapping: Any = None) -> torch.nn.Linear:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    embeddings.register_ops()
    layer = torch.nn.Linear(width, rows, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, width, generator=torch.Generator().manual_seed(rows + width)))
        layer.weight[:, 3] *= 8  # an outlier column, as real tables have
    if mapping is None:
        quantize_(layer, Int8WeightOnlyConfig(granularity=granularity))
    else:  # the config has no mapping type: build the tensor as the config would, asymmetric
        from torchao.quantization import Int8Tensor

        weight = Int8Tensor.from_hp(layer.weight.detach(), granularity, mapping_type=mapping)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


def _reference(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """torchao's numbers: the whole weight dequantized, then one matrix multiply."""
    weight = layer.weight.dequantize().to(x.dtype)
    out = x.reshape(-1, x.shape[-1]) @ weight.t()
    if layer.bias is not None:
        out = out + layer.bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


@pytest.mark.parametrize("batch", [(1, 1), (2, 64), (3,)])
@pytest.mark.parametrize("per", ["group32", "group64", "row"])
def test_equals_dequantize_then_matmul_within_fp32_tolerance(batch: tuple[int, ...], per: str) -> None:
    from torchao.quantization import PerGroup, PerRow

    granularity = PerRow() if per == "row" else PerGroup(int(per[5:]))
    # 3,000 rows of 192: several blocks of rows and a last, partial one (per row: large
    # enough to be handled).
    layer = _int8_linear(3000, 192, granularity, bias=True)
    assert int8_linear.BLOCK_VALUES // 192 < 3000
    x = torch.randn(*batch, 192, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert int8_linear.handles(x, layer.weight)
        got = layer(x)
        want = _reference(x, layer)
    assert got.shape == want.shape == (*batch, 3000) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_asymmetric_zero_points_and_bfloat16_activations() -> None:
    from torchao.quantization import MappingType, PerGroup

    layer = _int8_linear(700, 128, PerGroup(32), mapping=MappingType.ASYMMETRIC)
    assert bool(layer.weight.zero_point.any())  # the zero-point branch is exercised
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(x, layer), rtol=1e-5, atol=1e-4)
    bf16 = _int8_linear(700, 128, PerGroup(32), dtype=torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        got = bf16(xb)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), _reference(xb, bf16).float(), rtol=2e-2, atol=5e-2)


def test_a_backward_pass_and_int8_dynamic_go_to_torchao() -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, PerGroup, quantize_

    layer = _int8_linear(64, 64, PerGroup(32))
    x = torch.randn(2, 64, requires_grad=True)
    assert not int8_linear.handles(x, layer.weight)
    layer(x).sum().backward()  # torchao's path, with autograd
    assert x.grad is not None and x.grad.shape == x.shape
    dynamic = torch.nn.Linear(64, 64, bias=False)
    quantize_(dynamic, Int8DynamicActivationInt8WeightConfig())
    assert not int8_linear.handles(torch.randn(2, 64), dynamic.weight)


def test_a_quantized_models_grouped_lm_head_runs_the_blockwise_kernel(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = get_method("int8-weight-only").load_quantized(tiny_model, "cpu", 64)
    calls: list[tuple[int, ...]] = []
    real = int8_linear.linear

    def counting(activation: Any, weight: Any, bias: Any = None) -> Any:
        calls.append(tuple(weight.shape))
        return real(activation, weight, bias)

    monkeypatch.setattr(int8_linear, "linear", counting)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        model(input_ids=ids)
    # int8-weight-only's linears are in groups of 32 too: every linear, lm_head included, runs it.
    head = model.get_output_embeddings().weight
    assert tuple(head.shape) in calls
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(calls) == linears, (len(calls), linears)
    layer = model.model.layers[0].mlp.up_proj.weight
    assert list(layer.block_size) == [1, 32]


def test_a_small_per_row_weight_stays_on_torchaos_path() -> None:
    from torchao.quantization import PerRow

    layer = _int8_linear(128, 64, PerRow())
    assert not int8_linear.handles(torch.randn(1, 64), layer.weight)


def test_the_scratch_buffer_serves_inference_mode_and_no_grad_alike() -> None:
    from torchao.quantization import PerGroup

    int8_linear._local.buffers = {}  # first use under inference_mode, as the evaluation does
    layer = _int8_linear(3000, 192, PerGroup(32))
    x = torch.randn(2, 192)
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():  # then outside it, as generate() and the server do
        second = layer(x)
    torch.testing.assert_close(first, second)
