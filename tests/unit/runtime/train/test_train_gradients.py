"""Gradient clipping helpers (train/gradients.py) in one process; the distributed layouts
are compared with one process in test_train_distributed.py (their norms must match)."""

from __future__ import annotations

import pytest
import torch

from kubeforge_runtime.train import gradients


def test_total_norm_of_plain_gradients_is_torchs() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(4, 3), torch.randn(7), torch.randn(2, 2, 2)]
    expected = torch.nn.utils.get_total_norm([g.double() for g in grads])  # ours sums in float64
    assert gradients.total_norm(grads).item() == pytest.approx(expected.item(), rel=1e-6)


def test_total_norm_of_a_large_matrix_stays_exact() -> None:
    """A whole-tensor float32 norm of 4 M elements is ~3e-5 off; row norms summed in float64 are within float32 rounding."""
    torch.manual_seed(0)
    g = torch.randn(8000, 512)
    exact = g.double().norm().item()
    assert gradients.total_norm([g]).item() == pytest.approx(exact, rel=1e-6)


def test_clip_scales_down_to_the_bound_and_leaves_small_gradients_alone() -> None:
    grads = [torch.full((4,), 3.0), torch.full((9,), 4.0 / 3.0)]  # norm sqrt(36 + 16) = 7.21
    norm = gradients.total_norm(grads)
    gradients.clip_(grads, 1.0, norm)
    assert gradients.total_norm(grads).item() == pytest.approx(1.0, rel=1e-5)
    small = [torch.full((4,), 0.1)]
    gradients.clip_(small, 1.0, gradients.total_norm(small))
    assert torch.equal(small[0], torch.full((4,), 0.1))
