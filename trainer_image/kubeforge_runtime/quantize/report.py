"""The QuantizeJob report: a compact JSON for the pod's termination message, a full copy on disk.

Called by the runner. The compact report goes to ``$KUBEFORGE_REPORT_PATH``, else to
``contract.TERMINATION_LOG`` (``/dev/termination-log``) when that exists; Kubernetes copies that file into
``status.containerStatuses[].state.terminated.message``, which is how the operator reads the
result without giving the pod API access. Kubernetes truncates that message at 4096 bytes,
so the compact form is kept well below it (the message is shortened if it must be). The full
report, with per-run latencies, token counts and the lineage, goes to
``<output>/quantization-report.json`` next to the model.

Compact keys (camelCase; the operator copies them into ``status.result``)::

    originalBytes, quantizedBytes, compressionRatio,
    latencyMsPerToken: {before, after}, perplexity: {before, after},
    perplexityIncreasePercent, maxPerplexityIncreasePercent, gatePassed,
    method, reason, message, outputUri
    (a calibrating method also: uncalibrated: {method, perplexity, perplexityIncreasePercent, task?})

On a failure before measuring (bad config, unsupported method, unreadable model) only
``method``, ``reason``, ``message`` and ``gatePassed: false`` are present.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .. import contract

log = logging.getLogger(__name__)

MAX_REPORT_BYTES = 4096
"""Kubernetes' limit for a termination message."""
_BUDGET = 3072
"""What the compact report may use: leaves headroom below MAX_REPORT_BYTES."""

REASON_SUCCEEDED = "Succeeded"
REASON_QUALITY_GATE_FAILED = "QualityGateFailed"
REASON_CONFIG_ERROR = "ConfigError"
REASON_UNSUPPORTED_METHOD = "UnsupportedMethod"
REASON_INTERNAL_ERROR = "InternalError"


def report_path() -> Path | None:
    """``$KUBEFORGE_REPORT_PATH``, else the termination log if it exists, else None.

    The kubelet creates ``/dev/termination-log`` in the container; outside a pod it does not
    exist, and a local run must not create files under ``/dev``.
    """
    return contract.termination_log_path()


def _round(value: Any) -> Any:
    # Six significant digits keep a 0.01 % perplexity change visible without printing
    # float noise; JSON has no inf/nan, so those become null.
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def compact(report: dict[str, Any]) -> str:
    """Serialize the compact report, shortening ``message`` to stay under the budget."""
    body = {k: _round(v) for k, v in report.items()}
    text = json.dumps(body, separators=(",", ":"))
    overflow = len(text.encode()) - _BUDGET
    if overflow > 0 and isinstance(body.get("message"), str):
        message = body["message"].encode()
        body["message"] = message[: max(0, len(message) - overflow - 3)].decode(errors="ignore") + "..."
        text = json.dumps(body, separators=(",", ":"))
    return text


def write_compact(report: dict[str, Any]) -> Path | None:
    """Write the compact report to the termination-message path; return the path (or None)."""
    path = report_path()
    text = compact(report)
    if path is None:
        log.info("no %s and no %s: report not written; report: %s", contract.ENV_REPORT_PATH, contract.TERMINATION_LOG, text)
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        # Losing the report must not hide the job's own outcome: log it where kubectl logs sees it.
        log.error("could not write the report to %s (%s); report: %s", path, exc, text)
    return path


def write_full(report: dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / "quantization-report.json"
    path.write_text(json.dumps(_round(report), indent=2, sort_keys=True) + "\n")
    return path
