"""The fit check at admission: does a FineTuneJob or InferenceService fit the GPUs it asks for?

Called by the validating webhook (:mod:`kubeforge.controllers.webhooks`), ``kubeforge
validate`` and ``kubeforge plan`` (:mod:`kubeforge.cli`). The arithmetic is the runtime's
torch-free :mod:`kubeforge_runtime.fit`; this module finds its two inputs in a spec:

* **The limit**: ``resources.gpuMemory`` (a quantity, e.g. ``80Gi``), else the pod's
  ``template.nodeSelector["nvidia.com/gpu.memory"]`` (GPU feature discovery's label, MiB),
  when the selector pins the GPU type. Neither: nothing to compare with, no check.
* **The architecture**: the webhook cannot download a model, so it knows the architectures
  of the models KubeForge ships (:data:`KNOWN_ARCHITECTURES`, the embedded default
  SmolLM2-135M-Instruct under its hub name). Any other model (another ``hf://`` id, a
  ``pvc://``/``s3://`` directory, a ``fineTuneJobRef``) is admitted with a warning, and the
  FineTuneJob preflight makes the same check once ``config.json`` is local (exit 78, the same
  message), from ``$KUBEFORGE_GPU_MEMORY`` that the operator sets from the same limit.

A training layout is judged at ``nodes.min`` (the fewest data-parallel ranks shard least:
the most memory per GPU). A refusal names the estimate, the limit and the nearest layout
that fits, itself estimated (:func:`kubeforge_runtime.fit.nearest_fit`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from kubeforge_runtime import fit

GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
"""Node label of NVIDIA GPU feature discovery: memory of one GPU, in MiB."""
ENV_GPU_MEMORY = "KUBEFORGE_GPU_MEMORY"
"""Environment of training pods: the limit in bytes, for the preflight's fit check."""

gib = fit.gib

KNOWN_ARCHITECTURES: dict[str, fit.Architecture] = {
    # The embedded default (kubeforge_runtime/embedded.py), as its config.json says.
    "hf://HuggingFaceTB/SmolLM2-135M-Instruct": fit.Architecture(
        hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536, vocab_size=49152,
        tied_embeddings=True, head_dim=64, dtype_bytes=4),
}
KNOWN_MAX_POSITIONS = {"hf://HuggingFaceTB/SmolLM2-135M-Instruct": 8192}

_SUFFIX = {"": 1, "m": 10**-3, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_bytes(q: str | int) -> int:
    """Bytes of a Kubernetes quantity (``80Gi``, ``81920Mi``, ``8e10``, ``85899345920``)."""
    m = re.fullmatch(r"\+?([0-9.]+)([eE][0-9]+)?([a-zA-Z]*)", str(q).strip())
    try:
        value = float(m.group(1) + (m.group(2) or "")) * _SUFFIX[m.group(3)] if m else 0.0
    except (KeyError, ValueError):
        value = 0.0
    if value < 1:
        raise ValueError(f"resources.gpuMemory {q!r}: give the memory of one GPU as a positive quantity "
                         "(examples: 80Gi, 81920Mi)")
    return int(value)


def gpu_limit(spec: Mapping[str, Any]) -> tuple[int, str] | None:
    """(bytes per GPU, where that figure comes from) or None when the spec gives none."""
    resources = spec.get("resources") or {}
    if resources.get("gpuMemory") is not None:
        return quantity_bytes(resources["gpuMemory"]), f"resources.gpuMemory {resources['gpuMemory']}"
    label = ((spec.get("template") or {}).get("nodeSelector") or {}).get(GPU_MEMORY_LABEL)
    if label and str(label).isdigit():
        return int(label) * 2**20, f"nodeSelector {GPU_MEMORY_LABEL}={label} MiB"
    return None


def _base_uri(uri: str | None) -> str | None:
    return uri.split("@", 1)[0] if uri else None


def known_architecture(uri: str | None) -> fit.Architecture | None:
    """The architecture of a model the operator knows without downloading it."""
    return KNOWN_ARCHITECTURES.get(_base_uri(uri) or "")


@dataclass
class FitReport:
    """What the fit check found for one resource."""

    checked: bool
    fits: bool = True
    estimate: fit.Estimate | None = None
    limit: int | None = None
    source: str = ""
    message: str = ""
    warning: str = ""
    device: str = "cuda"
    plan: Any = None
    alternatives: list[fit.Alternative] = field(default_factory=list)
    nearest: fit.Alternative | None = None


def training_world(spec: Mapping[str, Any]) -> int:
    """Processes at ``nodes.min``: procsPerNode (default resources.gpus, or 1) x nodes.min."""
    gpus = int((spec.get("resources") or {}).get("gpus") or 0)
    ppn = int(spec.get("procsPerNode") or (gpus if gpus > 0 else 1))
    return ppn * int((spec.get("nodes") or {}).get("min", 1))


def _unknown(model: str, then: str = "") -> FitReport:
    """Not checked: the webhook cannot download a model to read its architecture."""
    return FitReport(checked=False, warning=f"fit not checked at admission: the architecture of {model} is known "
                                            f"only once it is downloaded{then}")


def check_finetune(spec: Mapping[str, Any], *, with_alternatives: bool = False,
                   arch: fit.Architecture | None = None) -> FitReport:
    """The fit check of a FineTuneJob spec (camelCase); ``arch`` overrides the known table."""
    limit = gpu_limit(spec)
    uri = (spec.get("model") or {}).get("uri")
    arch = arch or known_architecture(uri)
    if limit is None:
        return FitReport(checked=False)
    if arch is None:
        return _unknown(uri or "the referenced model",
                        f"; the preflight checks it against {limit[1]} before training starts")
    teacher = (spec.get("distillation") or {}).get("teacher") or {}
    extra: list[fit.ExtraTerm] = []
    if spec.get("method") == "distill" and teacher:
        teacher_arch = known_architecture(teacher.get("uri"))
        if teacher_arch is None:
            return _unknown(f"the distillation teacher {teacher.get('uri') or 'of the referenced FineTuneJob'}",
                            f"; the preflight checks student and teacher against {limit[1]} before training starts")
        extra.append(fit.teacher_term(teacher_arch))
    plan = fit.TrainPlan.from_spec(spec, world=training_world(spec))
    est = fit.estimate_training(arch, plan, extra=extra)
    report = FitReport(checked=True, fits=est.peak <= limit[0], estimate=est, limit=limit[0], source=limit[1],
                       plan=plan)
    if not report.fits or with_alternatives:
        report.alternatives = fit.alternatives(arch, plan, limit[0], extra=extra)
        report.nearest = next((a for a in report.alternatives if a.estimate.peak <= limit[0]), None)
    if not report.fits:
        report.message = "spec.resources: " + fit.misfit_message("this layout", est, limit[0], limit[1],
                                                                 report.nearest)
    return report


def check_inference(spec: Mapping[str, Any], *, arch: fit.Architecture | None = None) -> FitReport:
    """The fit check of an InferenceService spec: weights + KV cache + batch of one replica."""
    limit = gpu_limit(spec)
    uri = (spec.get("model") or {}).get("uri")
    arch = arch or known_architecture(uri)
    if limit is None:
        return FitReport(checked=False)
    if arch is None:
        return _unknown(uri or "the referenced model")
    serve = fit.ServePlan.from_spec(spec, KNOWN_MAX_POSITIONS.get(_base_uri(uri) or "", 2048))
    est = fit.estimate_serving(arch, serve)
    report = FitReport(checked=True, fits=est.peak <= limit[0], estimate=est, limit=limit[0], source=limit[1],
                       plan=serve)
    if not report.fits:
        report.message = "spec.engine: " + serving_message(arch, serve, est, limit[0], limit[1])
    return report


def serving_message(arch: fit.Architecture, serve: fit.ServePlan, est: fit.Estimate, limit: int, source: str) -> str:
    """The refusal for a replica that does not fit, with the engine settings that would."""
    msg = (f"this engine does not fit: estimated peak {est.describe()} per GPU exceeds {fit.gib(limit)} "
           f"({source})")
    changes: list[str] = []
    s = serve
    for _ in range(16):
        if fit.estimate_serving(arch, s).peak <= limit:
            break
        if s.max_concurrent_requests > 1:
            s = s.replace(max_concurrent_requests=s.max_concurrent_requests // 2)
        elif (s.max_model_length or s.max_position_embeddings) > 256:
            s = s.replace(max_model_length=(s.max_model_length or s.max_position_embeddings) // 2)
        elif s.max_batch_tokens > 256:
            s = s.replace(max_batch_tokens=s.max_batch_tokens // 2)
        else:
            break
    fitted = fit.estimate_serving(arch, s)
    if fitted.peak > limit:
        return msg + "; the weights alone need more: use GPUs with more memory, or a quantized model"
    if s.max_concurrent_requests != serve.max_concurrent_requests:
        changes.append(f"engine.maxConcurrentRequests: {s.max_concurrent_requests}")
    if s.max_model_length != serve.max_model_length:
        changes.append(f"engine.maxModelLength: {s.max_model_length}")
    if s.max_batch_tokens != serve.max_batch_tokens:
        changes.append(f"engine.maxBatchTokens: {s.max_batch_tokens}")
    return msg + f"; the nearest settings that fit ({fit.gib(fitted.peak)}): set " + ", ".join(changes)


def apply_changes(spec: Mapping[str, Any], changes: list[str]) -> dict[str, Any]:
    """A copy of ``spec`` with suggested changes (``"training.microBatchSize: 2"``) applied."""
    import copy

    import yaml

    out = copy.deepcopy(dict(spec))
    for change in changes:
        path, _, value = change.partition(": ")
        *parents, leaf = path.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(value)
    return out


def suggested_changes(message: str) -> list[str]:
    """The changes a refusal message suggests (after its last "): set "), for tools and tests."""
    _, sep, tail = message.rpartition("): set ")
    return [c.strip() for c in tail.split(", ")] if sep else []


def check(kind: str, spec: Mapping[str, Any]) -> FitReport:
    """The fit check of any KubeForge kind (QuantizeJob: not checked)."""
    if kind == "FineTuneJob":
        return check_finetune(spec)
    if kind == "InferenceService":
        return check_inference(spec)
    return FitReport(checked=False)
