"""Helpers shared by the serving runtime tests (tests/unit/runtime/serve).

Kept out of that directory's conftest.py: several test directories have a conftest, and a
test module importing ``conftest`` by name gets whichever was imported first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_config(model: Path, **engine: Any) -> dict[str, Any]:
    """A config as the operator renders it (camelCase), on free ports."""
    adapters = engine.pop("adapters", [])
    name = engine.pop("name", "demo")
    base = {
        "backend": "kubeforge",
        "batching": "auto",
        "dtype": "auto",
        "maxBatchTokens": 1024,
        "maxConcurrentRequests": 8,
        "maxQueuedRequests": 32,
        "kvBlockSize": 16,
        "maxModelLength": None,
        "requestTimeoutSeconds": 60,
    }
    base.update(engine)
    return {
        "kind": "InferenceService",
        "name": name,
        "namespace": "default",
        "servedModelName": name,
        "model": {"uri": f"file://{model}"},
        "adapters": adapters,
        "engine": base,
        "port": 0,
        "grpcPort": 0,
    }


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
