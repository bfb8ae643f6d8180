"""The QuantizeJob report's speed note: known limits of a method on a path, and measured slowness."""

from __future__ import annotations

from kubeforge_runtime.quantize.speed import latency_note


def test_int8_dynamic_eager_on_cpu_names_the_slow_kernel() -> None:
    note = latency_note("int8-dynamic", "cpu", compiled=False, before_ms=10.0, after_ms=8.0)
    assert "_int_scaled_matmul_cpu" in note and "engine.compile: on" in note
    assert "measured slower" not in note  # it measured faster here: only the known limit


def test_a_method_measured_slower_says_so_with_both_figures_on_any_path() -> None:
    assert latency_note("int4-weight-only", "cuda", compiled=True, before_ms=5.73, after_ms=7.21) == (
        "measured slower than the original through the server's path: 5.73 -> 7.21 ms/token at batch 1")


def test_nothing_to_say_is_empty() -> None:
    assert latency_note("int8-dynamic", "cpu", compiled=True, before_ms=10.0, after_ms=4.0) == ""
    assert latency_note("bf16", "cuda:0", compiled=True, before_ms=10.0, after_ms=9.0) == ""
