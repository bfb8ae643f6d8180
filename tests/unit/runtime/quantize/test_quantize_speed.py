"""The QuantizeJob report's speed note: known limits of a method on a path, the CPU's int8
reason (read from the real CPU flags), and measured slowness."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubeforge_runtime.quantize.speed import (INT8_DOT_FLAGS, CpuInt8Support, host_cpu, latency_note,
                                              parse_cpuinfo_flags)

AVX2_ONLY = CpuInt8Support("AVX2", frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"}))
VNNI = CpuInt8Support("AVX512", frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}))


def test_int8_dynamic_eager_on_cpu_names_the_slow_kernel() -> None:
    note = latency_note("int8-dynamic", "cpu", compiled=False, before_ms=10.0, after_ms=8.0, cpu=VNNI)
    assert "_int_scaled_matmul_cpu" in note and "engine.compile: on" in note
    assert "measured slower" not in note  # it measured faster here: only the known limit


def test_a_method_measured_slower_says_so_with_both_figures_on_any_path() -> None:
    assert latency_note("int4-weight-only", "cuda", compiled=True, before_ms=5.73, after_ms=7.21) == (
        "measured slower than the original through the server's path: 5.73 -> 7.21 ms/token at batch 1")


def test_nothing_to_say_is_empty() -> None:
    assert latency_note("int8-dynamic", "cpu", compiled=True, before_ms=10.0, after_ms=4.0, cpu=VNNI) == ""
    assert latency_note("bf16", "cuda:0", compiled=True, before_ms=10.0, after_ms=9.0) == ""


@pytest.mark.parametrize("method", ["int8-weight-only", "int8-dynamic"])
def test_int8_on_a_cpu_without_int8_dot_products_says_why_with_the_cpu_facts(method: str) -> None:
    note = latency_note(method, "cpu", compiled=True, before_ms=10.0, after_ms=12.0, cpu=AVX2_ONLY)
    assert "no int8 dot-product instructions" in note and "AVX2" in note and "avx512_vnni" in note
    # the same job on a VNNI CPU or on CUDA does not blame the CPU; nor does a non-int8 method
    assert "dot-product" not in latency_note(method, "cpu", compiled=True, before_ms=10.0, after_ms=12.0, cpu=VNNI)
    assert "dot-product" not in latency_note(method, "cuda", compiled=True, before_ms=10.0, after_ms=12.0, cpu=AVX2_ONLY)
    assert "dot-product" not in latency_note("int4-weight-only", "cpu", compiled=True, before_ms=10.0, after_ms=9.0,
                                             cpu=AVX2_ONLY)


def test_cpuinfo_flags_are_parsed_for_x86_and_arm() -> None:
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 avx512_vnni\n\nprocessor\t: 1\nflags\t: fpu\n"
    assert parse_cpuinfo_flags(x86) == frozenset({"fpu", "sse", "avx2", "avx512_vnni"})
    assert parse_cpuinfo_flags("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n") >= {"asimddp", "i8mm"}
    assert parse_cpuinfo_flags("no flags here") == frozenset()


def test_the_host_cpu_is_read_from_the_real_machine() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this OS")
    cpu = host_cpu()
    assert cpu.capability == torch.backends.cpu.get_cpu_capability()
    real = parse_cpuinfo_flags(cpuinfo.read_text())
    assert cpu.flags == real and cpu.int8_dot == tuple(f for f in INT8_DOT_FLAGS if f in real)
    note = latency_note("int8-weight-only", "cpu", compiled=False, before_ms=10.0, after_ms=9.0)
    assert ("no int8 dot-product instructions" in note) == (not cpu.int8_dot)
