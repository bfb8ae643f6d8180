"""What a QuantizeJob's report says about speed where a method cannot be fast on the device.

Called by the runner after both latency measurements (``metrics.served_latency``, through the
server's engine and ``engine.compile`` plan). Two kinds of statement, both in the report's
``latencyNote`` and its condition message, so a slow method is never presented as a win:

* **known limits** of a method on a device and path, from torchao's kernels: e.g. int8-dynamic
  run eagerly on a CPU quantizes every activation per call and multiplies through torchao's
  ``_int_scaled_matmul_cpu``, a decomposed form written for inductor to fuse, so it is slower
  than the original there (README "Measured": 0.26x eager on SmolLM2-135M);
* **what was measured**: when the quantized model decoded slower than the original through
  the same path, the report says so with both figures.
"""

from __future__ import annotations

_KNOWN_LIMITS: dict[tuple[str, str, bool], str] = {
    ("int8-dynamic", "cpu", False): (
        "int8-dynamic run eagerly on CPU quantizes every activation per call and multiplies through torchao's "
        "_int_scaled_matmul_cpu, written for inductor to fuse: expect it slower than the original unless served "
        "with engine.compile: on"
    ),
    ("int8-weight-only", "cpu", False): (
        "int8-weight-only run eagerly on CPU dequantizes the weights in every call: expect little or no speed-up "
        "over the original unless served with engine.compile: on"
    ),
    ("int8-dynamic", "cuda", False): (
        "int8-dynamic run eagerly on CUDA quantizes every activation per call: at batch 1 it measured about 10x "
        "slower than bf16 on an H200"
    ),
}


def latency_note(method: str, device: str, compiled: bool, before_ms: float, after_ms: float) -> str:
    """The report's note on speed for ``method`` on ``device`` (empty when there is nothing to say)."""
    parts = []
    known = _KNOWN_LIMITS.get((method, "cuda" if device.startswith("cuda") else "cpu", compiled))
    if known:
        parts.append(known)
    if after_ms > before_ms:
        parts.append(f"measured slower than the original through the server's path: {before_ms:.2f} -> "
                     f"{after_ms:.2f} ms/token at batch 1")
    return "; ".join(parts)
