"""Validating admission webhook: the checks the CRD schema and its CEL rules cannot make.

CEL sees one object; these checks need the other KubeForge resources in the namespace:

* **Outputs do not collide.** A FineTuneJob or QuantizeJob may not write where another job
  of the namespace writes (the same URI, or one inside the other, compared after
  :func:`kubeforge_runtime.contract.normalize_uri`, so ``pvc://m/a/../o/`` and ``pvc://m/o``
  are one location), unless that job has
  Failed: two jobs writing one directory corrupt each other, and overwriting a succeeded
  job's output would swap the model under whatever serves it.
* **References can still be satisfied.** ``fineTuneJobRef``/``quantizeJobRef`` naming a job
  that has Failed is rejected (the operator would wait for an output that never comes). A
  reference to a job that does not exist *yet* is allowed with a warning: GitOps tools
  apply a chain of resources in no particular order, and the operator waits for it.
* **A distillation teacher can be one.** ``distillation.teacher.fineTuneJobRef`` may not name
  the job itself, a job that has Failed, or a job writing a LoRA adapter (a teacher is a
  whole model: its ``output.format`` must be ``merged``); a teacher job that does not exist
  yet is allowed with a warning, as above.
* **No secret values in a spec.** An environment variable of ``spec.template.env`` named like a
  credential (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``*_PASSWORD``, ``*_API_KEY``) must come
  from ``valueFrom.secretKeyRef``: a literal value would sit in etcd, in every GitOps
  repository and in ``kubectl get -o yaml`` output. (CEL could express this one; it lives here
  with the other policy checks so that one place explains every admission refusal.)
* **The layout fits the GPUs.** With ``resources.gpuMemory`` (or a nodeSelector pinning
  ``nvidia.com/gpu.memory``) and a model whose architecture the operator knows, a FineTuneJob
  whose estimated peak per GPU exceeds that memory is refused with the estimate, the limit
  and the nearest layout that fits; an InferenceService likewise with the engine settings
  that fit (:mod:`kubeforge.fit`). An unknown model is admitted with a warning (the
  preflight checks it once the model is local).
* **The platform's workload policy.** ``spec.template`` may pass through only the volume
  types, image and ServiceAccount the platform allows (:mod:`kubeforge.api.policy`, read from
  the operator's settings, i.e. the chart's ``workloadPolicy`` values); every refused field
  is named. The operator applies the same policy again when it reconciles, for clusters
  without this webhook.
* **The spec fits kopf's bookkeeping.** kopf keeps a copy of the spec in the object's
  ``kopf.zalando.org/last-handled-configuration`` annotation, and the API server allows 256 KiB
  of annotations per object: a bigger spec (the schemaless parts of ``spec.template`` have no
  size bound of their own) would make every kopf patch of the object fail. The serialised spec
  plus the object's own annotations must stay within
  :data:`kubeforge.api.size.SPEC_BUDGET_BYTES` (the operator checks it again, for clusters
  without this webhook).

Reads go through :mod:`.cache` (a watch per kind and namespace), not a LIST per review. The
namespace of every check is the object's own ``metadata.namespace`` (:func:`object_namespace`),
never another field of the review; a review whose object has none, or whose UPDATE moves an
object between namespaces, is refused.

Not here: the API's own rules about one object (adapter names, reserved environment
variables, the parallel layout) live in the API models and, as CEL, in the CRDs; the API
server enforces them before it calls a webhook. Deliberately not checked: that ``apiKeySecretRef`` names an existing Secret. Checking it
would need the operator to read Secrets, which it otherwise never does; a missing Secret
shows up as the serving pods' ``CreateContainerConfigError`` and in the status instead.

Only CREATE and UPDATE are reviewed, and an UPDATE that leaves ``spec`` unchanged (kopf's
own annotation and finalizer patches, label edits) or touches an object being deleted is
always allowed, so the webhook can never block the operator's bookkeeping or a deletion.

Served by kopf's ``WebhookServer`` when the operator runs with ``--webhook-port`` (see
:mod:`kubeforge.controllers.runner`); the Helm chart owns the ValidatingWebhookConfiguration
and routes each kind to ``/<handler id>``, the ids below.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable

import kopf

from kubeforge_runtime import contract

from .. import fit
from ..api import KINDS, FineTuneJob, InferenceService, QuantizeJob
from ..api import policy
from ..api.size import SPEC_BUDGET_BYTES, size_problem, spec_size  # noqa: F401  (re-exported)
from ..builders import vllm
from . import cache
from .settings import workload_policy

log = logging.getLogger(__name__)

OPERATIONS = ["CREATE", "UPDATE"]

# Handler ids double as URL paths: https://<service>/<id> (the chart's webhook configuration).
WEBHOOK_PATHS = {k.plural: f"validate-{k.singular()}" for k in KINDS}
FINETUNE_WEBHOOK = WEBHOOK_PATHS[FineTuneJob.plural]
QUANTIZE_WEBHOOK = WEBHOOK_PATHS[QuantizeJob.plural]
INFERENCE_WEBHOOK = WEBHOOK_PATHS[InferenceService.plural]


# Whole words of an environment variable name that say it holds a credential.
SECRET_ENV = re.compile(r"(^|_)(TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIALS?|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY)($|_)", re.I)


# --- pure checks (unit-tested without a cluster) -----------------------------------------

uris_overlap = contract.uris_overlap
"""Whether two storage URIs are the same location or one lies inside the other (normalised
first: ``..``, ``.``, ``//``, trailing ``/`` and ``file://`` spellings cannot hide an overlap)."""


def output_fields(kind: str, spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, URI) of where a job of ``kind`` writes: its output and, for training, its checkpoints."""
    out = [("spec.output.uri", (spec.get("output") or {}).get("uri"))]
    if kind == "FineTuneJob":
        out.append(("spec.checkpoint.uri", (spec.get("checkpoint") or {}).get("uri")))
    return [(f, u) for f, u in out if u]


def output_uris(kind: str, spec: dict[str, Any]) -> list[str]:
    """Where a job of ``kind`` writes: its output and, for training, its checkpoints."""
    return [u for _f, u in output_fields(kind, spec)]


def output_conflicts(kind: str, name: str, spec: dict[str, Any],
                     others: Iterable[dict[str, Any]]) -> list[str]:
    """Messages for every other, not-failed job whose output overlaps this one's, each naming the field."""
    mine = output_fields(kind, spec)
    problems = []
    for other in others:
        okind, oname = other.get("kind", ""), other.get("metadata", {}).get("name")
        if (okind, oname) == (kind, name) or other.get("status", {}).get("phase") == "Failed":
            continue
        for field, uri in mine:
            for theirs in output_uris(okind, other.get("spec", {})):
                if uris_overlap(uri, theirs):
                    problems.append(
                        f"{field}: {uri} overlaps {theirs}, written by {okind} {oname}: choose another output "
                        f"location, or delete {okind} {oname} first")
    return problems


def secret_literals(spec: dict[str, Any]) -> list[str]:
    """Names of ``spec.template.env`` entries that look like credentials but carry a literal value."""
    env = ((spec.get("template") or {}).get("env")) or []
    return [e.get("name", "") for e in env if SECRET_ENV.search(e.get("name", "")) and e.get("value") is not None]


def secret_problem(spec: dict[str, Any]) -> str | None:
    """The refusal for credential-like literals in ``spec.template.env``, naming the field; None when fine."""
    names = secret_literals(spec)
    if not names:
        return None
    return (f"spec.template.env: {', '.join(names)} look like credentials: put the value in a Secret and use "
            f"valueFrom.secretKeyRef instead of value")


def object_namespace(body: Any, old: Any = None) -> str:
    """The namespace every check of this review uses: the object's own ``metadata.namespace``.

    The API server fills it in before admission; a review without it, or an UPDATE whose old
    and new objects disagree, cannot be judged and is refused rather than checked against
    some other namespace.
    """
    namespace = ((body or {}).get("metadata") or {}).get("namespace")
    if not namespace:
        raise kopf.AdmissionError("metadata.namespace: the object names no namespace; create it in one", code=400)
    old_namespace = ((old or {}).get("metadata") or {}).get("namespace")
    if old_namespace and old_namespace != namespace:
        raise kopf.AdmissionError(f"metadata.namespace: {namespace} differs from the stored object's "
                                  f"{old_namespace}; an object cannot move between namespaces", code=400)
    return str(namespace)


def reference_problem(ref_kind: str, ref_name: str, referenced: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(error, warning) for a reference to ``ref_kind``/``ref_name``; both None when fine."""
    if referenced is None:
        return None, (f"{ref_kind} {ref_name} does not exist (yet); this resource waits until it exists "
                      f"and has succeeded")
    if referenced.get("status", {}).get("phase") == "Failed":
        return (f"{ref_kind} {ref_name} has Failed and will never produce an output: reference a job that "
                f"can still succeed, or give a model uri"), None
    return None, None


def spec_unchanged(operation: str | None, old: Any, new: Any) -> bool:
    if operation != "UPDATE" or old is None or new is None:
        return False
    return dict(old.get("spec") or {}) == dict(new.get("spec") or {})


# --- kopf handlers ---------------------------------------------------------------------

def _skip(operation: str | None, body: Any, old: Any, new: Any) -> bool:
    if body.get("metadata", {}).get("deletionTimestamp"):
        return True
    return spec_unchanged(operation, old, new)


def _check_secrets(body: Any) -> None:
    problem = secret_problem(dict(body.get("spec") or {}))
    if problem:
        raise kopf.AdmissionError(problem, code=422)


def _check_size(body: Any) -> None:
    problem = size_problem(dict(body))
    if problem:
        raise kopf.AdmissionError(problem, code=422)


def _check_policy(body: Any) -> None:
    problems = policy.problems((body.get("spec") or {}).get("template"), workload_policy())
    if problems:
        raise kopf.AdmissionError("; ".join(problems), code=422)


def _check_fit(kind: str, body: Any, warnings: list[str]) -> None:
    try:
        report = fit.check(kind, dict(body.get("spec") or {}))
    except ValueError as exc:  # a quantity the schema lets through but that is no memory size
        raise kopf.AdmissionError(f"spec.{exc}", code=422) from None
    if report.checked and not report.fits:
        raise kopf.AdmissionError(report.message, code=422)
    if report.warning:
        warnings.append(report.warning)


def _check_outputs(kind: str, namespace: str, body: Any) -> None:
    problems = output_conflicts(kind, body["metadata"].get("name", ""), dict(body.get("spec") or {}),
                                cache.jobs(namespace))
    if problems:
        raise kopf.AdmissionError("; ".join(problems), code=409)


def _check_reference(namespace: str, ref_kind: str, ref: dict[str, Any] | None, warnings: list[str],
                     where: str = "spec.model") -> None:
    if not ref or not ref.get("name"):
        return
    error, warning = reference_problem(ref_kind, ref["name"], cache.get(ref_kind, namespace, ref["name"]))
    if error:
        field = "fineTuneJobRef" if ref_kind == "FineTuneJob" else "quantizeJobRef"
        raise kopf.AdmissionError(f"{where}.{field}: {error}", code=422)
    if warning:
        warnings.append(warning)


def teacher_problem(name: str, ref_name: str, teacher: dict[str, Any] | None) -> str | None:
    """Why a FineTuneJob's ``distillation.teacher.fineTuneJobRef`` can never give a teacher, or None."""
    where = "spec.distillation.teacher.fineTuneJobRef"
    if ref_name == name:
        return f"{where}: a job cannot be its own teacher; name the FineTuneJob that trains the teacher"
    out = ((teacher or {}).get("spec") or {}).get("output") or {}
    if out.get("format") == "adapter":
        return (f"{where}: FineTuneJob {ref_name} writes a LoRA adapter (output.format adapter); a teacher must be a "
                "whole model: set its output.format to merged")
    return None


def _check_teacher(namespace: str, body: Any, warnings: list[str]) -> None:
    ref = ((((body.get("spec") or {}).get("distillation") or {}).get("teacher")) or {}).get("fineTuneJobRef")
    if not ref or not ref.get("name"):
        return
    problem = teacher_problem(body["metadata"].get("name", ""), ref["name"],
                              cache.get("FineTuneJob", namespace, ref["name"]))
    if problem:
        raise kopf.AdmissionError(problem, code=422)
    _check_reference(namespace, "FineTuneJob", ref, warnings, where="spec.distillation.teacher")


@kopf.on.validate(*FineTuneJob.resource(), id=FINETUNE_WEBHOOK, operations=OPERATIONS)
def validate_finetunejob(body: Any, old: Any, new: Any, operation: str | None,
                         warnings: list[str], **_: Any) -> None:
    if _skip(operation, body, old, new):
        return
    namespace = object_namespace(body, old)
    _check_size(body)
    _check_secrets(body)
    _check_policy(body)
    _check_fit("FineTuneJob", body, warnings)
    _check_teacher(namespace, body, warnings)
    _check_outputs("FineTuneJob", namespace, body)


@kopf.on.validate(*QuantizeJob.resource(), id=QUANTIZE_WEBHOOK, operations=OPERATIONS)
def validate_quantizejob(body: Any, old: Any, new: Any, operation: str | None,
                         warnings: list[str], **_: Any) -> None:
    if _skip(operation, body, old, new):
        return
    namespace = object_namespace(body, old)
    _check_size(body)
    _check_secrets(body)
    _check_policy(body)
    spec = body.get("spec") or {}
    _check_reference(namespace, "FineTuneJob", (spec.get("model") or {}).get("fineTuneJobRef"), warnings)
    _check_outputs("QuantizeJob", namespace, body)


@kopf.on.validate(*InferenceService.resource(), id=INFERENCE_WEBHOOK, operations=OPERATIONS)
def validate_inferenceservice(body: Any, old: Any, new: Any, operation: str | None,
                              warnings: list[str], **_: Any) -> None:
    if _skip(operation, body, old, new):
        return
    namespace = object_namespace(body, old)
    _check_size(body)
    _check_secrets(body)
    _check_policy(body)
    spec = body.get("spec") or {}
    model = spec.get("model") or {}
    _check_reference(namespace, "FineTuneJob", model.get("fineTuneJobRef"), warnings)
    _check_reference(namespace, "QuantizeJob", model.get("quantizeJobRef"), warnings)
    _check_fit("InferenceService", body, warnings)
    _check_backend_input(namespace, spec)


def _check_backend_input(namespace: str, spec: dict[str, Any]) -> None:
    """``engine.backend: vllm`` on a QuantizeJob output vLLM cannot load (by the job's method)."""
    ref = (spec.get("model") or {}).get("quantizeJobRef") or {}
    if ((spec.get("engine") or {}).get("backend")) != "vllm" or not ref.get("name"):
        return
    job = cache.get("QuantizeJob", namespace, ref["name"])
    problem = vllm.vllm_quantize_problem((job or {}).get("spec"))
    if problem:
        raise kopf.AdmissionError(f"spec.model.quantizeJobRef: {problem}", code=422)
