"""Each method on the tiny model: bytes of the linear weights, logits, capability checks.

Tolerances are relative L2 errors of the logits against the fp32 model on the same input,
``||q - f|| / ||f||``, measured on the random-weight tiny model (random Gaussian weights
are harder to quantize than trained ones): int8 ~0.01, int4 (groups of 64) ~0.17,
fp16 ~0.001, bf16 ~0.007. The limits below leave about 1.5-3x headroom.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubeforge_runtime import models
from kubeforge_runtime.quantize import metrics
from kubeforge_runtime.quantize.methods import Int4WeightOnlyMethod, UnsupportedMethodError, get_method

GROUP_SIZE = 64  # as in conftest.py: divides the tiny preset's input widths (64, 128)

LOGITS_REL_TOLERANCE = {
    "int8-dynamic": 0.03,
    "int8-weight-only": 0.03,
    "int4-weight-only": 0.25,
    "fp16": 2e-3,
    "bf16": 2e-2,
}


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, Any]:
    model = models.load_causal_lm(tiny_model).eval()
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    return {"ids": ids, "logits": logits, "linear_bytes": metrics.linear_weight_bytes(model)}


def _linear_weights(model: Any) -> list[Any]:
    head = model.get_output_embeddings()
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


@pytest.mark.parametrize("name", list(LOGITS_REL_TOLERANCE))
def test_logits_stay_within_tolerance_of_fp32(name: str, tiny_model: Path, reference: dict[str, Any]) -> None:
    model = get_method(name).load_quantized(tiny_model, "cpu", GROUP_SIZE)
    with torch.no_grad():
        logits = model(reference["ids"]).logits.float()
    rel = float((logits - reference["logits"]).norm() / reference["logits"].norm())
    assert rel < LOGITS_REL_TOLERANCE[name], f"{name}: relative logits error {rel:.4f}"
    assert logits.argmax(-1).eq(reference["logits"].argmax(-1)).float().mean() > 0.5


@pytest.mark.parametrize("name", ["int8-dynamic", "int8-weight-only"])
def test_int8_linear_weights_take_a_quarter_of_fp32(name: str, tiny_model: Path, reference: dict[str, Any]) -> None:
    model = get_method(name).load_quantized(tiny_model, "cpu", GROUP_SIZE)
    weights = _linear_weights(model)
    assert all(w.qdata.dtype == torch.int8 for w in weights)
    # The int8 data is exactly 1/4. int8-dynamic: one fp32 scale per output row adds 4 bytes
    # per row, i.e. 1/K of the fp32 size (K = 64 or 128 here, so at most +1/64; less at real
    # widths). int8-weight-only: an fp32 scale and an int8 zero point per 32 values of a row
    # (methods.INT8_LINEAR_GROUP) add 5 bytes per 128 bytes of fp32, whatever the width.
    data = sum(w.qdata.numel() * w.qdata.element_size() for w in weights)
    assert data * 4 == reference["linear_bytes"]
    ratio = metrics.linear_weight_bytes(model) / reference["linear_bytes"]
    if name == "int8-weight-only":
        from kubeforge_runtime.quantize.methods import INT8_LINEAR_GROUP

        assert all(list(w.block_size) == [1, INT8_LINEAR_GROUP] for w in weights)
        assert ratio == pytest.approx(0.25 + 5 / (4 * INT8_LINEAR_GROUP)), ratio
    else:
        assert 0.25 <= ratio <= 0.28, ratio


def test_int4_linear_weights_take_an_eighth_of_fp32(tiny_model: Path, reference: dict[str, Any]) -> None:
    model = get_method("int4-weight-only").load_quantized(tiny_model, "cpu", GROUP_SIZE)
    weights = _linear_weights(model)
    assert all(type(w).__name__ == "Int4OpaqueTensor" for w in weights)
    # Two weights per byte: the packed data is exactly 1/8. Each group of GROUP_SIZE weights
    # adds an fp32 scale and zero point (8 bytes = 2/GROUP_SIZE of the group's fp32 bytes).
    data = sum(w.qdata.numel() * w.qdata.element_size() for w in weights)
    assert data * 8 == reference["linear_bytes"]
    ratio = metrics.linear_weight_bytes(model) / reference["linear_bytes"]
    assert 0.125 <= ratio <= 0.125 + 2 / GROUP_SIZE, ratio


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_precision_halves_the_weights(name: str, tiny_model: Path, reference: dict[str, Any]) -> None:
    model = get_method(name).load_quantized(tiny_model, "cpu", GROUP_SIZE)
    assert metrics.linear_weight_bytes(model) * 2 == reference["linear_bytes"]


def test_every_method_runs_on_this_cpu() -> None:
    for name in LOGITS_REL_TOLERANCE:
        get_method(name).check_supported("cpu", GROUP_SIZE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_int4_on_missing_cuda_names_an_alternative() -> None:
    # A real capability failure, not a mock: the CUDA int4 kernel on a machine with no GPU.
    with pytest.raises(UnsupportedMethodError, match="use method 'int8-weight-only' instead"):
        get_method("int4-weight-only").check_supported("cuda", GROUP_SIZE)


def test_a_kernel_error_becomes_unsupported_method(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kernel(self: Int4WeightOnlyMethod, device: str, group_size: int) -> Any:
        raise NotImplementedError("_weight_int4pack_mm_for_cpu is not available")

    monkeypatch.setattr(Int4WeightOnlyMethod, "_config", no_kernel)
    with pytest.raises(UnsupportedMethodError, match="int8-weight-only"):
        get_method("int4-weight-only").check_supported("cpu", GROUP_SIZE)


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="int8-dynamic"):
        get_method("int3")
