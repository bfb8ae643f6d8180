"""Read a workload's Prometheus endpoint: how the operator learns training progress.

Workload pods have no API token, so they cannot report to the API server; the trainer's
rank 0 serves gauges (names in ``kubeforge_runtime.contract``) and the operator reads them.
Called by :mod:`kubeforge.controllers.finetune`'s progress poller. Every failure (refused,
timed out, not Prometheus text) yields None and a debug log line: progress is a nicety and
an unreachable endpoint must never stall or fail a reconcile.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 1.0
MAX_BYTES = 1 << 20


def parse(text: str, prefix: str = "kubeforge_") -> dict[str, float]:
    """Unlabelled samples whose name starts with ``prefix``: ``{name: value}``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix) and not sample.labels:
                out[sample.name] = float(sample.value)
    return out


def fetch(url: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, float] | None:
    """The samples at ``url`` (``http://ip:port/metrics``), or None when unreachable or unreadable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http to a pod IP
            body = resp.read(MAX_BYTES).decode("utf-8", "replace")
        return parse(body)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        # No log line here: it would repeat every poll for every job; the caller logs changes.
        _ = exc
        return None
