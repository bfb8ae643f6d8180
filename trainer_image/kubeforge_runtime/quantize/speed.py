"""What a QuantizeJob's report says about speed where a method cannot be fast on the device.

Called by the runner after both latency measurements (``metrics.served_latency``, through the
server's engine and ``engine.compile`` plan). Two kinds of statement, both in the report's
``latencyNote`` and its condition message, so a slow method is never presented as a win:

* **known limits** of a method on a device and path, from torchao's kernels: e.g. int8-dynamic
  run eagerly on a CPU quantizes every activation per call and multiplies through torchao's
  ``_int_scaled_matmul_cpu``, a decomposed form written for inductor to fuse, so it is slower
  than the original there (README "Measured": 0.26x eager on SmolLM2-135M);
* **the CPU's reason**: int8 methods on a CPU without int8 dot-product instructions (x86:
  AVX-512 VNNI, AVX-VNNI or AMX-INT8; Arm: the dot-product/i8mm extensions) have no int8
  multiply to be fast with: every int8 kernel torch and torchao have there widens the int8
  weights (and, for int8-dynamic, activations) to wider types before multiplying. Read from the
  real CPU (``/proc/cpuinfo`` flags and ``torch.backends.cpu.get_cpu_capability()``), not
  assumed; ``benchmarks/bench_int8_kernels.py`` measures each int8 kernel against fp32 on it;
* **what was measured**: when the quantized model decoded slower than the original through
  the same path, the report says so with both figures.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
"""``/proc/cpuinfo`` flags of instructions that multiply int8 by int8 into int32 sums."""

INT8_METHODS = ("int8-dynamic", "int8-weight-only")


@dataclass(frozen=True)
class CpuInt8Support:
    """What the CPU offers int8 matmuls: torch's CPU capability and its int8 dot-product flags."""

    capability: str
    """``torch.backends.cpu.get_cpu_capability()``, e.g. ``AVX2``, ``AVX512``."""
    flags: frozenset[str]
    """All ``/proc/cpuinfo`` flags (x86 ``flags``, Arm ``Features``)."""

    @property
    def int8_dot(self) -> tuple[str, ...]:
        """The int8 dot-product flags this CPU has (empty: none)."""
        return tuple(f for f in INT8_DOT_FLAGS if f in self.flags)

    def describe(self) -> str:
        """One line: the capability and the int8 dot-product flags present or missing."""
        have = ", ".join(self.int8_dot) or f"none of {'/'.join(INT8_DOT_FLAGS)}"
        return f"torch CPU capability {self.capability}; int8 dot-product flags: {have}"


def parse_cpuinfo_flags(text: str) -> frozenset[str]:
    """The flags of the first processor in ``/proc/cpuinfo`` text (x86 ``flags``, Arm ``Features``)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def host_cpu() -> CpuInt8Support:
    """This machine's CPU, read once from ``/proc/cpuinfo`` and torch."""
    import torch

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read, only torch's capability
        text = ""
    return CpuInt8Support(torch.backends.cpu.get_cpu_capability(), parse_cpuinfo_flags(text))


def cpu_reason(method: str, cpu: CpuInt8Support) -> str:
    """Why an int8 ``method`` cannot decode fast on ``cpu`` (empty where the CPU has int8 dot products)."""
    if method not in INT8_METHODS or cpu.int8_dot:
        return ""
    return (f"this CPU has no int8 dot-product instructions ({cpu.describe()}): its int8 kernels widen the int8 "
            "values before multiplying, so int8 saves memory here but is not expected to decode faster than fp32 "
            "(README: int8 kernels on this CPU)")

_KNOWN_LIMITS: dict[tuple[str, str, bool], str] = {
    ("int8-dynamic", "cpu", False): (
        "int8-dynamic run eagerly on CPU quantizes every activation per call and multiplies through torchao's "
        "_int_scaled_matmul_cpu, written for inductor to fuse: expect it slower than the original unless served "
        "with engine.compile: on"
    ),
    ("int8-weight-only", "cpu", False): (
        "int8-weight-only run eagerly on CPU dequantizes the weights in every call: expect little or no speed-up "
        "over the original"
    ),
    ("int8-dynamic", "cuda", False): (
        "int8-dynamic run eagerly on CUDA quantizes every activation per call: at batch 1 it measured about 10x "
        "slower than bf16 on an H200"
    ),
}


def latency_note(method: str, device: str, compiled: bool, before_ms: float, after_ms: float,
                 cpu: CpuInt8Support | None = None) -> str:
    """The report's note on speed for ``method`` on ``device`` (empty when there is nothing to say).

    ``cpu``: the CPU the job ran on (default: this machine's, :func:`host_cpu`); only read on CPU.
    """
    parts = []
    kind = "cuda" if device.startswith("cuda") else "cpu"
    known = _KNOWN_LIMITS.get((method, kind, compiled))
    if known:
        parts.append(known)
    if kind == "cpu":
        reason = cpu_reason(method, cpu or host_cpu())
        if reason:
            parts.append(reason)
    if after_ms > before_ms:
        parts.append(f"measured slower than the original through the server's path: {before_ms:.2f} -> "
                     f"{after_ms:.2f} ms/token at batch 1")
    return "; ".join(parts)
