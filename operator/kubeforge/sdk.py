"""A small Python SDK: the product in a few lines, locally or on a cluster.

    from kubeforge.sdk import FineTuner, Quantizer, InferenceServer

    tuned = FineTuner(training_data="data.jsonl", evaluation_data="test.jsonl").run(epochs=3, batch_size=16)
    small = Quantizer(model_path=tuned.output_path, method="dynamic_int8", calibration_data="data.jsonl").apply()
    with InferenceServer(model_path=small.output_path).deploy() as server:
        print(server.complete("Review: The meal was lovely.\\nSentiment:"))

``run()``/``apply()``/``deploy()`` execute locally through the same builders and local runner
as ``kubeforge run``. ``submit(namespace=...)`` creates the resource on the cluster of the
current kubeconfig instead, and ``.wait()`` follows its status until it finishes. Every
object is first validated against the API models, so a bad argument fails here with the
same message the API server would give.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubeforge_runtime.embedded import HUB_URI as DEFAULT_BASE_MODEL

from .api import API_VERSION, KIND_BY_NAME
from .manifests import parse_resource

log = logging.getLogger(__name__)

_METHOD_ALIASES = {
    "dynamic_int8": "int8-dynamic", "int8_dynamic": "int8-dynamic", "int8-dynamic": "int8-dynamic",
    "int8": "int8-weight-only", "int8_weight_only": "int8-weight-only", "int8-weight-only": "int8-weight-only",
    "int4": "int4-weight-only", "int4_weight_only": "int4-weight-only", "int4-weight-only": "int4-weight-only",
    "awq": "int4-weight-only-awq", "int4_awq": "int4-weight-only-awq", "int4-weight-only-awq": "int4-weight-only-awq",
    "fp16": "fp16", "float16": "fp16", "bf16": "bf16", "bfloat16": "bf16",
}
_ADAPTERS = {"lora": "lora", "qlora": "qlora", None: "full", "none": "full", "full": "full"}


def to_uri(location: str | Path) -> str:
    """A path on this machine becomes file:///abs/path; URIs (hf://, pvc://, s3://) stay."""
    s = str(location)
    if re.match(r"^[a-z0-9]+://", s):
        return s
    return "file://" + str(Path(s).expanduser().resolve())


def _detect_format(path: str | Path) -> str:
    """text, prompt-completion or chat, from the first record of a local JSONL file."""
    p = Path(str(path).removeprefix("file://"))
    if not p.exists():
        return "text"
    with open(p) as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                if "messages" in rec:
                    return "chat"
                if "prompt" in rec and "completion" in rec:
                    return "prompt-completion"
                return "text"
    return "text"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40] or "job"


@dataclass
class Submission:
    """A resource created on a cluster; ``wait()`` follows its status."""

    kind: str
    plural: str
    name: str
    namespace: str

    def status(self) -> dict[str, Any]:
        from . import kube  # the Kubernetes client is the operator extra's; local runs do without

        obj = kube.get(self.kind, self.namespace, self.name)
        return (obj or {}).get("status", {})

    def wait(self, timeout: float = 3600, poll: float = 2.0, until: tuple[str, ...] = ("Succeeded",)) -> dict[str, Any]:
        """Block until the phase is one of ``until`` (or Failed, which raises)."""
        deadline = time.monotonic() + timeout
        last_phase = None
        while time.monotonic() < deadline:
            status = self.status()
            phase = status.get("phase")
            if phase != last_phase:
                log.info("%s/%s: %s", self.kind, self.name, phase)
                last_phase = phase
            if phase in until:
                return status
            if phase == "Failed":
                failed = next((c for c in status.get("conditions", []) if c.get("type") == "Failed"), {})
                raise RuntimeError(f"{self.kind}/{self.name} failed: {failed.get('reason')}: {failed.get('message')}")
            time.sleep(poll)
        raise TimeoutError(f"{self.kind}/{self.name} still {last_phase} after {timeout:.0f}s")


def _submit(manifest: dict[str, Any], namespace: str) -> Submission:
    from . import kube

    manifest = json.loads(json.dumps(manifest))
    manifest["metadata"]["namespace"] = namespace
    kind = manifest["kind"]
    kube.server_side_apply(manifest)
    return Submission(kind, KIND_BY_NAME[kind].plural, manifest["metadata"]["name"], namespace)


@dataclass(kw_only=True)
class FineTuner:
    """Fine-tune ``base_model`` (default: the embedded SmolLM2-135M-Instruct) on
    ``training_data`` (a JSONL file or URI); with ``evaluation_data``, the held-out ``metric``
    is measured before and after training (on its first ``evaluation_samples`` records, else
    the API's default)."""

    training_data: str
    base_model: str = DEFAULT_BASE_MODEL
    evaluation_data: str | None = None
    metric: str = "accuracy"
    evaluation_samples: int | None = None
    adapter_type: str | None = "lora"
    output: str | None = None
    name: str | None = None
    validation_data: str | None = None
    data_format: str | None = None
    sequence_length: int = 256
    nodes: int = 1
    procs_per_node: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    strategy: str = "fsdp"
    extra_spec: dict[str, Any] = field(default_factory=dict)

    def manifest(self, epochs: int = 1, batch_size: int = 8, learning_rate: float = 1e-3,
                 max_steps: int | None = None, micro_batch_size: int | None = None, seed: int = 42) -> dict[str, Any]:
        """The FineTuneJob these arguments describe (validated)."""
        if self.adapter_type not in _ADAPTERS:
            raise ValueError(f"adapter_type {self.adapter_type!r}: use 'lora', 'qlora' or None for full fine-tuning")
        method = _ADAPTERS[self.adapter_type]
        name = self.name or _slug(f"ft-{Path(str(self.training_data)).stem}")
        world = self.nodes * self.procs_per_node
        dp = max(1, world // (self.tensor_parallel * self.pipeline_parallel))
        micro = micro_batch_size or max(1, batch_size // dp)
        training: dict[str, Any] = {"epochs": epochs, "globalBatchSize": batch_size, "microBatchSize": micro,
                                    "learningRate": learning_rate, "seed": seed, "precision": "fp32"}
        if max_steps:
            training["maxSteps"] = max_steps
        spec: dict[str, Any] = {
            "model": {"uri": to_uri(self.base_model)},
            "dataset": {"uri": to_uri(self.training_data),
                        "format": self.data_format or _detect_format(self.training_data),
                        "sequenceLength": self.sequence_length},
            "method": method,
            "parallelism": {"tensor": self.tensor_parallel, "pipeline": self.pipeline_parallel, "strategy": self.strategy},
            "nodes": {"min": self.nodes, "max": self.nodes},
            "procsPerNode": self.procs_per_node,
            "training": training,
            "output": {"uri": to_uri(self.output or f"./kubeforge-runs/{name}/model"),
                       "format": "merged"},
            **self.extra_spec,
        }
        if self.validation_data:
            spec["dataset"]["validationUri"] = to_uri(self.validation_data)
        if self.evaluation_data:
            spec["evaluation"] = {"uri": to_uri(self.evaluation_data), "metric": self.metric}
            if self.evaluation_samples is not None:
                spec["evaluation"]["maxSamples"] = self.evaluation_samples
        doc = {"apiVersion": API_VERSION, "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
        parse_resource(doc, "FineTuner")
        return doc

    def run(self, epochs: int = 1, batch_size: int = 8, **kwargs: Any):
        """Train here, now (torchrun processes on this machine); returns the local result."""
        from .local.runner import LocalRunner

        return LocalRunner(workdir=Path("kubeforge-runs")).run_manifest(self.manifest(epochs, batch_size, **kwargs))

    def submit(self, namespace: str = "default", epochs: int = 1, batch_size: int = 8, **kwargs: Any) -> Submission:
        return _submit(self.manifest(epochs, batch_size, **kwargs), namespace)


@dataclass(kw_only=True)
class Quantizer:
    """Compress ``model_path`` with ``method`` and measure size, latency and perplexity (on
    ``evaluation_data``, else the runtime's reference text) and, with ``task_data``, the
    held-out ``metric`` of the input and the output (on its first ``task_samples`` records,
    else the API's default)."""

    model_path: str
    method: str = "int8-dynamic"
    calibration_data: str | None = None
    evaluation_data: str | None = None
    task_data: str | None = None
    metric: str = "accuracy"
    task_samples: int | None = None
    max_accuracy_drop_points: float | None = None
    output: str | None = None
    name: str | None = None
    max_perplexity_increase_percent: float = 1.0
    group_size: int = 32

    def manifest(self) -> dict[str, Any]:
        method = _METHOD_ALIASES.get(self.method)
        if method is None:
            raise ValueError(f"method {self.method!r}: choose one of {sorted(set(_METHOD_ALIASES))}")
        name = self.name or _slug(f"q-{Path(str(self.model_path)).name}-{method}")
        spec: dict[str, Any] = {
            "model": {"uri": to_uri(self.model_path)},
            "method": method,
            "groupSize": self.group_size,
            "evaluation": {"maxPerplexityIncreasePercent": self.max_perplexity_increase_percent},
            "output": {"uri": to_uri(self.output or f"./kubeforge-runs/{name}/model")},
        }
        if self.calibration_data:
            spec["calibration"] = {"uri": to_uri(self.calibration_data)}
        if self.evaluation_data:
            spec["evaluation"]["uri"] = to_uri(self.evaluation_data)
        if self.task_data:
            spec["evaluation"]["task"] = {"uri": to_uri(self.task_data), "metric": self.metric}
            if self.task_samples is not None:
                spec["evaluation"]["task"]["maxSamples"] = self.task_samples
        if self.max_accuracy_drop_points is not None:
            spec["evaluation"]["maxAccuracyDropPoints"] = self.max_accuracy_drop_points
        doc = {"apiVersion": API_VERSION, "kind": "QuantizeJob", "metadata": {"name": name}, "spec": spec}
        parse_resource(doc, "Quantizer")
        return doc

    def apply(self):
        """Quantize here, now; returns the local result with the measured report."""
        from .local.runner import LocalRunner

        return LocalRunner(workdir=Path("kubeforge-runs")).run_manifest(self.manifest())

    def submit(self, namespace: str = "default") -> Submission:
        return _submit(self.manifest(), namespace)


@dataclass(kw_only=True)
class InferenceServer:
    """Serve ``model_path`` over the OpenAI API."""

    model_path: str
    name: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    max_concurrent_requests: int = 8

    def manifest(self) -> dict[str, Any]:
        name = self.name or _slug(f"svc-{Path(str(self.model_path)).name}")
        spec: dict[str, Any] = {
            "model": {"uri": to_uri(self.model_path)},
            "engine": {"maxConcurrentRequests": self.max_concurrent_requests},
            "adapters": [{"name": n, "uri": to_uri(u)} for n, u in self.adapters.items()],
        }
        doc = {"apiVersion": API_VERSION, "kind": "InferenceService", "metadata": {"name": name}, "spec": spec}
        parse_resource(doc, "InferenceServer")
        return doc

    def deploy(self):
        """Start the server here; returns a handle with ``complete()``, ``chat()`` and ``stop()``."""
        from .local.runner import LocalRunner

        return LocalRunner(workdir=Path("kubeforge-runs")).start_server(self.manifest())

    def submit(self, namespace: str = "default") -> Submission:
        return _submit(self.manifest(), namespace)
