"""QuantizeJob reconciler: wait for the input, run the quantizer Job, report what it cost.

The shared loop is :class:`.reconcile.Reconciler`; this module gives it the QuantizeJob's
steps and registers the kopf handlers (on import, by :mod:`kubeforge.controllers`). Flow of
one QuantizeJob:

1. the spec is validated (``Accepted``); an invalid spec is permanent (``InvalidSpec``);
2. with ``model.fineTuneJobRef`` the job waits (phase ``WaitingForInput``, condition
   ``InputReady=False/WaitingForInput``) until that FineTuneJob has ``Succeeded``, then uses its
   ``status.output.uri``; if the FineTuneJob fails, this job fails with ``InputFailed``;
3. a ConfigMap (the runtime config) and a one-pod ``batch/v1`` Job are created (pure builders
   in :mod:`kubeforge.builders.quantize`) once the status saying so is written; the Job is
   created once and never re-applied (its pod template is immutable, and a started job must
   not change under its pod);
4. the Job's conditions and its pod's termination message give the phase and the result
   (:mod:`.quantize_status`, a pure function).

Triggers: create/update/resume of the QuantizeJob, events of the child Jobs (debounced),
events of FineTuneJobs (to start waiting jobs as soon as their input succeeds). No timer:
kopf re-lists every watched kind when a watch restarts and resumes every object when the
operator starts, which replays anything missed, and a timer would make kopf put a finalizer
on every object (deleting one would then hang while the operator is down).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from .. import kube
from ..api import FineTuneJob, QuantizeJob, QuantizeJobSpec
from ..builders import quantize as builder
from . import quantize_status
from .conditions import TERMINAL_PHASES, Event, now, true_condition
from .events import post as post_event
from .reconcile import Reconciler, apply_children, ensure_free, owned_by, reference_keys
from .references import resolve_model

log = logging.getLogger(__name__)

KIND = QuantizeJob.kind


def _step(obj: dict[str, Any], spec: QuantizeJobSpec, *,
          job_hint: dict[str, Any] | None = None) -> quantize_status.QuantizeOutcome:
    """Read the Job (and, before it exists, the input; once it finished, its pod); compute the status."""
    meta = obj["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    if (obj.get("status") or {}).get("phase") in TERMINAL_PHASES:
        return quantize_status.QuantizeOutcome(obj["status"])  # never resurrected: nothing to read
    job = kube.get("Job", namespace, builder.job_name(name))
    if (job is None and job_hint is not None and owned_by(job_hint, obj)
            and true_condition(job_hint, *quantize_status.FINISHED)):
        # The Job may be gone already (ttlSecondsAfterFinished: 0); its last event still
        # shows how it ended, and without it the reconciler would start the work again. A
        # Job deleted before it finished is simply created again.
        job = job_hint
    # Both children's names must be free (or ours) before the status announces the Job.
    ensure_free(obj, "Job", builder.job_name(name), job)
    if job is None:
        ensure_free(obj, "ConfigMap", builder.config_map_name(name))
    resolution = resolve_model(spec.model, lambda kind, ref: kube.get(kind, namespace, ref)) if job is None else None
    pods: list[dict[str, Any]] = []
    uid = ((job or {}).get("metadata") or {}).get("uid")
    if uid and true_condition(job, *quantize_status.FINISHED):
        pods = kube.list_("Pod", namespace, f"batch.kubernetes.io/controller-uid={uid}")
    return quantize_status.compute(obj, spec=spec, resolution=resolution, job=job, pods=pods, now=now())


def _after(obj: dict[str, Any], spec: QuantizeJobSpec, outcome: quantize_status.QuantizeOutcome,
           changed: bool) -> None:
    """Create the ConfigMap and Job once the status saying so is written."""
    uri = outcome.create_with_model_uri
    if uri:
        meta = obj["metadata"]
        apply_children(obj, builder.build_children(meta["name"], meta["namespace"], meta["uid"], spec, uri))
        log.info("%s/%s: created Job %s for model %s", meta["namespace"], meta["name"],
                 builder.job_name(meta["name"]), uri)


reconciler: Reconciler[QuantizeJobSpec] = Reconciler(
    QuantizeJob, validate=quantize_status.validate, step=_step, after=_after)


# --- kopf handlers --------------------------------------------------------------------------
@kopf.on.resume(*QuantizeJob.resource())
@kopf.on.create(*QuantizeJob.resource())
@kopf.on.update(*QuantizeJob.resource(), field="spec")
def on_spec(name: str, namespace: str, status: Any, body: Any, reason: Any, **_: Any) -> None:
    if status.get("phase") in TERMINAL_PHASES and reason == "update":
        # A finished job stays finished; a spec change does not re-run it.
        log.info("%s/%s is %s; spec changes are ignored (create a new QuantizeJob)", namespace, name, status.get("phase"))
        post_event(dict(body), Event("Warning", "SpecChangeIgnored",
                                     f"the job is {status.get('phase')}; create a new QuantizeJob to run again"))
    elif reason == "update" and kube.get("Job", namespace, builder.job_name(name)) is not None:
        # A Job's pod template is immutable and its pod is already working on the old spec.
        post_event(dict(body), Event("Warning", "SpecChangeIgnored",
                                     "the quantizer Job has already started; the change applies to a new QuantizeJob"))
    reconciler.request(namespace, name)


@kopf.on.event("batch", "v1", "jobs", id="quantizejob-child-jobs", labels=reconciler.child_labels)
async def on_child_job(body: Any, namespace: str, labels: Any, **_: Any) -> None:
    reconciler.schedule(namespace, labels[reconciler.owner_label], job_hint=dict(body))


REFERENCES = ((("model",), "fineTuneJobRef"),)
"""Where a QuantizeJob names another job: ``spec.model.fineTuneJobRef``."""


@kopf.index(*QuantizeJob.resource(), id="quantizejob_references")
async def quantizejob_references(name: str, namespace: str, spec: Any, **_: Any) -> dict[Any, str]:
    """kopf's index of the QuantizeJobs by the FineTuneJob they name (:func:`.reconcile.reference_keys`).

    A coroutine: kopf indexes each event of the kind before its other handlers, and a plain
    function would first wait for one of kopf's handler threads, behind a burst's spec handlers
    (a new object's own spec handler after it)."""
    return reference_keys(namespace, name, spec, REFERENCES)


@kopf.on.event(*FineTuneJob.resource(), id="quantizejob-inputs")
async def on_finetunejob(body: Any, name: str, namespace: str, type: str | None,
                         quantizejob_references: kopf.Index[Any, str], **_: Any) -> None:
    await reconciler.fan_out_nonblocking("fineTuneJobRef", body, name, namespace, type, index=quantizejob_references)


# Deleted: forget it (the children go by ownerReferences, the garbage collector's work).
kopf.on.event(*QuantizeJob.resource(), id="quantizejob-deleted")(reconciler.on_event_nonblocking)
