"""InferenceService reconciler: resolve the model, apply the serving children, report status.

The shared loop is :class:`.reconcile.Reconciler`; this module gives it the
InferenceService's step and registers the kopf handlers (on import, by
:mod:`kubeforge.controllers`). Flow of one InferenceService:

1. the spec is validated (``Accepted``; :func:`.inference_status.validate`): besides the
   schema, the name must be a DNS-1035 label (it names the Service) and adapter names must be
   unique and differ from it (the API model's rule,
   :meth:`kubeforge.api.inference.InferenceService.validate_object`);
2. the model is resolved: ``model.uri`` directly, or the output of ``fineTuneJobRef`` /
   ``quantizeJobRef`` once that job has ``Succeeded`` (:mod:`.references`). Until then the
   status says ``WaitingForInput`` (or ``InputFailed``) and nothing is deployed - unless an
   earlier output is already being served, which then keeps serving;
3. the children (:mod:`kubeforge.builders.inference`) are applied by server-side apply: the
   NetworkPolicy (:mod:`kubeforge.builders.network`, unless turned off), the
   serve ConfigMap, the Deployment, the Service, the HPA (deleted again when ``replicas.max ==
   replicas.min``) and the PDB. A new output of the referenced job has a new *revision*
   (re-created job, new URI, new completion), which changes a pod-template annotation, so
   the Deployment rolls its pods;
4. status from the Deployment and its pods (:mod:`.inference_status`, a pure function).

Triggers: create/update/resume of the InferenceService (apply + status); events of its
Deployment and pods (debounced; status only, so that the HPA's replica changes are never
fought); events of FineTuneJobs and QuantizeJobs (apply + status for the services that
reference the one that changed).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import kopf

from .. import kube
from ..api import FineTuneJob, InferenceService, InferenceServiceSpec, QuantizeJob
from ..builders import common
from ..builders import inference as builder
from ..builders import network, vllm
from . import inference_status
from .conditions import Outcome, now
from .reconcile import Reconciler, apply_children, controlled_by, ensure_free, reference_keys
from .references import Resolution, resolve_model
from .settings import network_policy_settings

log = logging.getLogger(__name__)

KIND = InferenceService.kind


def vllm_input_check(spec: InferenceServiceSpec, resolution: Resolution,
                     get: Callable[[str, str], dict[str, Any] | None]) -> Resolution:
    """``resolution``, or a failed one when ``backend: vllm`` references a QuantizeJob whose
    method vLLM cannot load (:func:`kubeforge.builders.vllm.vllm_quantize_problem`; the
    webhook refuses this at admission when the job already exists)."""
    ref = spec.model.quantize_job_ref
    if spec.engine.backend != "vllm" or ref is None:
        return resolution
    job = get("QuantizeJob", ref.name)
    problem = vllm.vllm_quantize_problem((job or {}).get("spec"))
    if problem is None:
        return resolution
    return Resolution("failed", reason="InputFailed", message=f"spec.model.quantizeJobRef: {problem}")


def _step(obj: dict[str, Any], spec: InferenceServiceSpec, *, apply: bool = False) -> Outcome:
    """Resolve the model, apply the children (``apply``), read the Deployment's pods, compute the status."""
    meta = obj["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    deployment = kube.get("Deployment", namespace, name)
    ensure_free(obj, "Deployment", name, deployment)  # never serve or scale a foreign Deployment
    read: dict[tuple[str, str], dict[str, Any] | None] = {}  # the referenced job, read once for both checks

    def get(kind: str, ref: str) -> dict[str, Any] | None:
        if (kind, ref) not in read:
            read[(kind, ref)] = kube.get(kind, namespace, ref)
        return read[(kind, ref)]

    resolution = vllm_input_check(spec, resolve_model(spec.model, get), get)
    if apply:
        model = (builder.ModelRef(resolution.uri, resolution.revision or "")
                 if resolution.state == "ready" and resolution.uri else inference_status.served_model(deployment))
        if model is not None:
            current = (deployment or {}).get("spec", {}).get("replicas")
            children = builder.build_children(name, namespace, meta["uid"], spec, model, current)
            to_apply = children.to_apply()
            net = network_policy_settings()
            if net.enabled:  # first: no server ever runs unprotected
                to_apply.insert(0, network.inference_policy(name, namespace, meta["uid"], net))
            for child, applied in zip(to_apply, apply_children(obj, to_apply)):
                if child["kind"] == "Deployment":
                    deployment = applied
            if children.hpa is None:
                hpa = kube.get("HorizontalPodAutoscaler", namespace, name)
                if hpa is not None and controlled_by(hpa, obj):
                    kube.delete("HorizontalPodAutoscaler", namespace, name, uid=hpa["metadata"]["uid"])
                    log.info("%s/%s: deleted the HPA (replicas.min == replicas.max)", namespace, name)
    pods: list[dict[str, Any]] = []
    if deployment is not None and not (inference_status.rollout_complete(deployment)
                                       and (deployment.get("status") or {}).get("readyReplicas")):
        selector = ",".join(f"{k}={v}" for k, v in common.selector_labels(KIND, name).items())
        pods = kube.list_("Pod", namespace, selector)
    return inference_status.compute(obj, resolution=resolution, deployment=deployment, pods=pods, now=now())


reconciler: Reconciler[InferenceServiceSpec] = Reconciler(
    InferenceService, validate=inference_status.validate, step=_step)


# --- kopf handlers --------------------------------------------------------------------------
@kopf.on.resume(*InferenceService.resource())
@kopf.on.create(*InferenceService.resource())
@kopf.on.update(*InferenceService.resource(), field="spec")
def on_spec(name: str, namespace: str, **_: Any) -> None:
    reconciler.request(namespace, name, apply=True)


@kopf.on.event("apps", "v1", "deployments", id="inferenceservice-deployments", labels=reconciler.child_labels)
async def on_deployment(namespace: str, labels: Any, type: str | None, **_: Any) -> None:
    # Status only, so the HPA's replica changes are never fought; a Deployment deleted from
    # under a live InferenceService is created again.
    reconciler.schedule(namespace, labels[reconciler.owner_label], apply=type == "DELETED")


@kopf.on.event("", "v1", "pods", id="inferenceservice-pods", labels=reconciler.child_labels)
async def on_pod(namespace: str, labels: Any, **_: Any) -> None:
    # A crash-looping server need not change the Deployment's status; its pod does.
    reconciler.schedule(namespace, labels[reconciler.owner_label])


REFERENCES = ((("model",), "fineTuneJobRef"), (("model",), "quantizeJobRef"))
"""Where an InferenceService names a job: ``spec.model.fineTuneJobRef`` or ``spec.model.quantizeJobRef``."""


@kopf.index(*InferenceService.resource(), id="inferenceservice_references")
async def inferenceservice_references(name: str, namespace: str, spec: Any, **_: Any) -> dict[Any, str]:
    """kopf's index of the InferenceServices by the job they name (:func:`.reconcile.reference_keys`).

    A coroutine: kopf indexes each event of the kind before its other handlers, and a plain
    function would first wait for one of kopf's handler threads, behind a burst's spec handlers
    (a new object's own spec handler after it)."""
    return reference_keys(namespace, name, spec, REFERENCES)


@kopf.on.event(*FineTuneJob.resource(), id="inferenceservice-finetune-inputs")
async def on_finetunejob(body: Any, name: str, namespace: str, type: str | None,
                         inferenceservice_references: kopf.Index[Any, str], **_: Any) -> None:
    await reconciler.fan_out_nonblocking("fineTuneJobRef", body, name, namespace, type,
                                         index=inferenceservice_references, apply=True)


@kopf.on.event(*QuantizeJob.resource(), id="inferenceservice-quantize-inputs")
async def on_quantizejob(body: Any, name: str, namespace: str, type: str | None,
                         inferenceservice_references: kopf.Index[Any, str], **_: Any) -> None:
    await reconciler.fan_out_nonblocking("quantizeJobRef", body, name, namespace, type,
                                         index=inferenceservice_references, apply=True)


# Deleted: forget it (the children go by ownerReferences, the garbage collector's work).
kopf.on.event(*InferenceService.resource(), id="inferenceservice-deleted")(reconciler.on_event_nonblocking)
