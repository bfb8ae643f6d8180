"""Progress reporting: the rank-0 Prometheus endpoint, structured log events and MFU.

Called by the trainer on global rank 0 (other ranks get a no-op reporter). The operator
scrapes the endpoint for progress (metric names from ``contract.py``), ``kubeforge run``
reads the log events. Both are part of the pod contract (``trainer_image/CONTRACT.md``).

Log events are single stdout lines ``contract.LOG_EVENT_PREFIX + JSON`` (written directly,
not through ``logging``, so that their format never depends on a log configuration).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from .. import contract

log = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peak FLOP/s per device (vendor datasheets, SXM where both
# exist). fp32 training on these parts runs on TF32 at half these rates at best.
PEAK_FLOPS_BF16: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}
ENV_PEAK_FLOPS = "KUBEFORGE_PEAK_FLOPS"
"""Override of the per-device peak FLOP/s used for MFU (e.g. for hardware not in the table)."""


def peak_flops_per_device(precision: str) -> float | None:
    """Peak FLOP/s of one accelerator, or None where unknown (CPUs, unlisted GPUs)."""
    override = os.environ.get(ENV_PEAK_FLOPS)
    if override:
        return float(override)
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_FLOPS_BF16, key=len, reverse=True):  # "L40S" before "L4"
        if key in name:
            peak = PEAK_FLOPS_BF16[key]
            return peak if precision in ("bf16", "fp16") else peak / 2
    return None


def flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention scores
    (12 * layers * hidden * sequence), as in the PaLM paper's MFU definition."""
    return 6.0 * num_params + 12.0 * num_layers * hidden * seq_len


def emit_event(event: str, **fields: Any) -> None:
    """Write one structured event line to stdout (rank 0 only calls this)."""
    sys.stdout.write(contract.LOG_EVENT_PREFIX + json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
    sys.stdout.flush()


class Reporter:
    """Gauges on a private registry, served over HTTP on ``$KUBEFORGE_METRICS_PORT``."""

    def __init__(self, enabled: bool, port: int | None = None) -> None:
        self.enabled = enabled
        self.port: int | None = None
        self._server: Any = None
        if not enabled:
            return
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        g = lambda name, doc: Gauge(name, doc, registry=self.registry)  # noqa: E731
        self.step = g(contract.METRIC_STEP, "Optimizer steps completed")
        self.total_steps = g(contract.METRIC_TOTAL_STEPS, "Optimizer steps the run will take")
        self.epoch = g(contract.METRIC_EPOCH, "Current epoch (0-based)")
        self.loss = g(contract.METRIC_LOSS, "Training loss of the last step (mean over target tokens)")
        self.tokens_per_second = g(contract.METRIC_TOKENS_PER_SECOND, "Training tokens per second, all ranks")
        self.learning_rate = g(contract.METRIC_LEARNING_RATE, "Learning rate of the last step")
        self.mfu = g(contract.METRIC_MFU, "Model FLOPs utilisation estimate (0-1; absent where the peak is unknown)")
        self.grad_norm = g(contract.METRIC_GRAD_NORM, "L2 norm of the last step's whole gradient, before clipping")
        self.last_checkpoint = g(contract.METRIC_LAST_CHECKPOINT_STEP, "Step of the last completed checkpoint")
        self.task_metric = Gauge(contract.METRIC_TASK_METRIC, "Held-out task metric (0-1) of the base model "
                                 "(stage=before) and of the output (stage=after)", ["stage"], registry=self.registry)
        namespace, job = os.environ.get(contract.ENV_NAMESPACE), os.environ.get(contract.ENV_JOB_NAME)
        if namespace and job:  # who this endpoint speaks for: the operator checks it before reading progress
            Gauge(contract.METRIC_JOB, "The job this trainer works for (always 1)", ["namespace", "name"],
                  registry=self.registry).labels(namespace=namespace, name=job).set(1)
        if port is None:
            port = int(os.environ.get(contract.ENV_METRICS_PORT, contract.DEFAULT_METRICS_PORT))
        try:
            from prometheus_client import start_http_server

            self._server, _thread = start_http_server(port, registry=self.registry)
            self.port = self._server.server_address[1]
            log.info("metrics on :%d/metrics", self.port)
        except OSError as exc:
            # Training matters more than its progress display: carry on without the endpoint.
            log.warning("cannot serve metrics on port %d (%s); continuing without them", port, exc)

    def update(self, **values: float | None) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            if value is not None:
                getattr(self, name).set(value)

    def task(self, stage: str, value: float) -> None:
        if self.enabled:
            self.task_metric.labels(stage=stage).set(value)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
