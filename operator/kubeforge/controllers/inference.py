"""InferenceService reconciler: resolve the model, apply the serving children, report status.

Flow of one InferenceService:

1. the spec is validated (``Accepted``); besides the schema, the name must be a DNS-1035
   label (it names the Service) and adapter names must be unique and differ from it;
2. the model is resolved: ``model.uri`` directly, or the output of ``fineTuneJobRef`` /
   ``quantizeJobRef`` once that job has ``Succeeded`` (:mod:`.references`). Until then the
   status says ``WaitingForInput`` (or ``InputFailed``) and nothing is deployed - unless an
   earlier output is already being served, which then keeps serving;
3. the children (:mod:`kubeforge.builders.inference`) are applied by server-side apply: the
   serve ConfigMap, the Deployment, the Service, the HPA (deleted again when ``replicas.max ==
   replicas.min``) and the PDB. A new output of the referenced job has a new *revision*
   (re-created job, new URI, new completion), which changes a pod-template annotation, so
   the Deployment rolls its pods;
4. status: ``phase``, conditions ``Accepted`` / ``ModelReady`` / ``Ready`` (reasons such as
   ``WaitingForInput``, ``InputFailed``, ``Loading``, ``ModelLoadFailed``, ``ModelLoaded``,
   ``Serving``), ``url``, ``replicas {ready, desired}``, ``modelUri``, ``modelRevision``,
   ``observedGeneration``.

Triggers: create/update/resume of the InferenceService (apply + status); events of its
Deployment and pods (label ``app.kubernetes.io/component=inference-server``; status only, so
that the HPA's replica changes are never fought); events of FineTuneJobs and QuantizeJobs
(apply + status for the services that reference the one that changed). :func:`compute_status`
is the pure core the unit tests drive.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from .. import kube
from ..api import FineTuneJob, InferenceService, InvalidSpec, QuantizeJob, describe_validation_error
from ..api.inference import InferenceServiceSpec
from ..builders import common
from ..builders import inference as builder
from .conditions import get_condition, now, set_condition
from .events import Event, post as post_event
from .references import Resolution, resolve, resolve_uri

log = logging.getLogger(__name__)

GROUP_VERSION = InferenceService.resource()
KIND = InferenceService.kind
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Container states that mean the model server cannot start as configured.
_BAD_WAITING = {"CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError",
                "CreateContainerError", "InvalidImageName", "RunContainerError"}


def validate(obj: dict[str, Any]) -> InferenceServiceSpec:
    """The typed spec, or InvalidSpec/ValidationError."""
    spec = InferenceServiceSpec.model_validate(obj.get("spec") or {})
    name = (obj.get("metadata") or {}).get("name", "")
    if len(name) > 63 or not _DNS_1035.match(name):
        raise InvalidSpec(f"metadata.name {name!r} must be a DNS-1035 label (lower-case letters, digits and '-', "
                          f"starting with a letter, at most 63 characters): it names the Service")
    names = [a.name for a in spec.adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidSpec(f"spec.adapters: names must be unique; repeated: {', '.join(dupes)}")
    if name in names:
        raise InvalidSpec(f"spec.adapters: adapter name {name!r} clashes with the base model, which is served "
                          f"under the InferenceService's name; rename the adapter")
    return spec


@dataclass
class Outcome:
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)


def served_model(deployment: dict[str, Any] | None) -> builder.ModelRef | None:
    """The model the Deployment's pod template carries (what is served or being rolled out)."""
    if not deployment:
        return None
    ann = (((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("annotations") or {}
    uri, rev = ann.get(builder.ANNOTATION_MODEL_URI), ann.get(builder.ANNOTATION_MODEL_REVISION)
    return builder.ModelRef(uri, rev or "") if uri else None


def rollout_complete(deployment: dict[str, Any]) -> bool:
    """Every replica runs the current pod template (the Deployment's own definition of done)."""
    meta, spec, st = deployment.get("metadata") or {}, deployment.get("spec") or {}, deployment.get("status") or {}
    desired = spec.get("replicas", 1)
    return ((st.get("observedGeneration") or 0) >= (meta.get("generation") or 0)
            and (st.get("updatedReplicas") or 0) == desired
            and (st.get("replicas") or 0) == desired
            and (st.get("availableReplicas") or 0) >= desired)


def load_failure(deployment: dict[str, Any], pods: list[dict[str, Any]], revision: str | None) -> str | None:
    """Why the current revision's pods cannot serve, or None."""
    for cond in (deployment.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False" \
                and cond.get("reason") == "ProgressDeadlineExceeded":
            return f"the rollout made no progress: {cond.get('message', 'progress deadline exceeded')}"
    for pod in pods:
        meta = pod.get("metadata") or {}
        if (meta.get("deletionTimestamp") or
                (revision and (meta.get("annotations") or {}).get(builder.ANNOTATION_MODEL_REVISION) != revision)):
            continue  # an old revision's pod, or one going away
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") != builder.CONTAINER_NAME:
                continue
            waiting = (cs.get("state") or {}).get("waiting") or {}
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
            if waiting.get("reason") in _BAD_WAITING or (term and term.get("exitCode", 0) != 0):
                parts = [f"pod {meta.get('name')}"]
                if waiting.get("reason"):
                    parts.append(f"{waiting['reason']}{': ' + waiting['message'] if waiting.get('message') else ''}")
                if term:
                    code = term.get("exitCode")
                    what = "configuration error" if code == 78 else term.get("reason") or "error"
                    msg = (term.get("message") or "").strip()
                    parts.append(f"exited {code} ({what}){': ' + msg[-400:] if msg else ''}")
                return "; ".join(parts)
    return None


def compute_status(obj: dict[str, Any], resolution: Resolution, deployment: dict[str, Any] | None,
                   pods: list[dict[str, Any]], at: str | None = None) -> Outcome:
    """The InferenceService's status from what was read; pure."""
    at = at or now()
    meta = obj.get("metadata") or {}
    name, namespace, generation = meta.get("name", ""), meta.get("namespace", ""), meta.get("generation")
    old = obj.get("status") or {}
    st = copy.deepcopy(old)
    events: list[Event] = []
    conds = st.get("conditions") or []
    before_accepted = get_condition(conds, "Accepted")
    conds = set_condition(conds, "Accepted", True, "Accepted", "spec is valid", generation, at)
    if not before_accepted or before_accepted.get("status") != "True":
        events.append(Event("Normal", "Accepted", f"generation {generation} accepted"))
    st["observedGeneration"] = generation
    st["url"] = builder.url(name, namespace)

    served = served_model(deployment)
    dep_spec, dep_st = (deployment or {}).get("spec") or {}, (deployment or {}).get("status") or {}
    desired = int(dep_spec.get("replicas", 1)) if deployment else 0
    ready = int(dep_st.get("readyReplicas") or 0)
    st["replicas"] = {"ready": ready, "desired": desired}
    if served:
        st["modelUri"], st["modelRevision"] = served.uri, served.revision
    # The reference has not (yet) produced what the spec asks for: said in the messages even
    # while an earlier output keeps serving.
    pending_input = "" if resolution.state == "ready" else resolution.message

    if deployment is None:
        if resolution.state in ("waiting", "missing"):
            phase, mr, rd = "WaitingForInput", (False, "WaitingForInput", resolution.message), \
                (False, "WaitingForInput", resolution.message)
        elif resolution.state == "failed":
            phase, mr, rd = "Failed", (False, "InputFailed", resolution.message), \
                (False, "InputFailed", resolution.message)
        else:
            msg = f"deploying {resolution.uri}"
            phase, mr, rd = "Pending", (False, "Loading", msg), (False, "Loading", msg)
    else:
        done = rollout_complete(deployment)
        revision = served.revision if served else None
        failure = load_failure(deployment, pods, revision)
        rev_text = f"revision {revision} ({served.uri})" if served else "the model"
        if failure:
            mr = (False, "ModelLoadFailed", f"{rev_text} failed to load: {failure}")
        elif desired == 0:
            mr = (False, "ScaledToZero", "no replicas")
        elif done and ready >= 1:
            mr = (True, "ModelLoaded", f"{rev_text} loaded and warmed up on {ready} replica(s)")
        else:
            updated = int(dep_st.get("updatedReplicas") or 0)
            mr = (False, "Loading", f"loading {rev_text}: {updated}/{desired} replicas updated, {ready} ready")
        if pending_input:
            mr = (mr[0], mr[1], f"{mr[2]}; {pending_input}")
        if ready >= 1:
            msg = f"{ready}/{desired} replicas ready"
            if not done:
                msg += f"; rolling out {rev_text}"
            rd, phase = (True, "Serving", msg), "Running"
        elif desired == 0:
            rd, phase = (False, "ScaledToZero", "the Deployment has no replicas"), "Suspended"
        elif failure:
            rd, phase = (False, "ModelLoadFailed", mr[2]), "Failed"
        else:
            rd, phase = (False, "Loading", f"no replica ready yet: {mr[2]}"), "Pending"

    before_model = get_condition(conds, "ModelReady")
    conds = set_condition(conds, "ModelReady", mr[0], mr[1], mr[2], generation, at)
    conds = set_condition(conds, "Ready", rd[0], rd[1], rd[2], generation, at)
    st["conditions"] = conds
    st["phase"] = phase

    old_phase = old.get("phase")
    if phase != old_phase:
        warn = phase == "Failed"
        reason = {"Running": "Serving", "WaitingForInput": "WaitingForInput"}.get(phase, rd[1])
        events.append(Event("Warning" if warn else "Normal", reason, rd[2]))
    elif mr[1] == "ModelLoadFailed" and (not before_model or before_model.get("reason") != "ModelLoadFailed"):
        events.append(Event("Warning", "ModelLoadFailed", mr[2]))
    if served and old.get("modelRevision") and old.get("modelRevision") != served.revision:
        events.append(Event("Normal", "RollingOut", f"rolling out revision {served.revision} ({served.uri})"))
    return Outcome(st, events)


def invalid_status(obj: dict[str, Any], message: str, at: str | None = None) -> Outcome:
    meta = obj.get("metadata") or {}
    old = obj.get("status") or {}
    st = copy.deepcopy(old)
    before = get_condition(st.get("conditions"), "Accepted")
    st["conditions"] = set_condition(st.get("conditions"), "Accepted", False, "InvalidSpec", message,
                                     meta.get("generation"), at)
    st["observedGeneration"] = meta.get("generation")
    st["phase"] = old.get("phase") or "Pending"
    events = []
    if not before or before.get("reason") != "InvalidSpec" or before.get("message") != message:
        events.append(Event("Warning", "InvalidSpec", message))
    return Outcome(st, events)


# --- I/O around the core --------------------------------------------------------------------
_locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks[(namespace, name)]


def _owned_by(child: dict[str, Any] | None, owner: dict[str, Any]) -> bool:
    uid = (owner.get("metadata") or {}).get("uid")
    return bool(child) and any(r.get("uid") == uid for r in (child.get("metadata") or {}).get("ownerReferences") or [])


def _resolve(spec: InferenceServiceSpec, namespace: str) -> Resolution:
    m = spec.model
    if m.uri is not None:
        return resolve_uri(m.uri)
    kind, ref = ("FineTuneJob", m.fine_tune_job_ref) if m.fine_tune_job_ref else ("QuantizeJob", m.quantize_job_ref)
    assert ref is not None  # the model validator guarantees exactly one source
    return resolve(kind, ref.name, kube.get(kind, namespace, ref.name))


def reconcile(namespace: str, name: str, apply: bool = True) -> dict[str, Any] | None:
    """Read, (optionally) apply the children, write status. ``apply=False``: status only."""
    with _lock(namespace, name):
        obj = kube.get(KIND, namespace, name)
        if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
            return None
        old = obj.get("status") or {}
        try:
            spec = validate(obj)
        except (ValidationError, InvalidSpec) as exc:
            message = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
            outcome = invalid_status(obj, message)
            _write(obj, old, outcome)
            return outcome.status
        deployment = kube.get("Deployment", namespace, name)
        if deployment is not None and not _owned_by(deployment, obj):
            outcome = invalid_status(obj, f"a Deployment named {name} exists and is not owned by this "
                                          f"InferenceService; delete it or rename the InferenceService")
            _write(obj, old, outcome)
            return outcome.status
        resolution = _resolve(spec, namespace)
        if apply:
            model = (builder.ModelRef(resolution.uri, resolution.revision or "")
                     if resolution.state == "ready" and resolution.uri else served_model(deployment))
            if model is not None:
                current = (deployment or {}).get("spec", {}).get("replicas")
                children = builder.build_children(name, namespace, obj["metadata"]["uid"], spec, model, current)
                for child in children.to_apply():
                    applied = kube.server_side_apply(child)
                    if child["kind"] == "Deployment":
                        deployment = applied
                if children.hpa is None:
                    hpa = kube.get("HorizontalPodAutoscaler", namespace, name)
                    if hpa is not None and _owned_by(hpa, obj):
                        kube.delete("HorizontalPodAutoscaler", namespace, name)
                        log.info("%s/%s: deleted the HPA (replicas.min == replicas.max)", namespace, name)
        pods: list[dict[str, Any]] = []
        if deployment is not None and not (rollout_complete(deployment)
                                           and (deployment.get("status") or {}).get("readyReplicas")):
            selector = ",".join(f"{k}={v}" for k, v in common.selector_labels(KIND, name).items())
            pods = kube.list_("Pod", namespace, selector)
        outcome = compute_status(obj, resolution, deployment, pods)
        _write(obj, old, outcome)
        return outcome.status


def _write(obj: dict[str, Any], old: dict[str, Any], outcome: Outcome) -> None:
    meta = obj["metadata"]
    if outcome.status != old:
        kube.patch_merge(KIND, meta["namespace"], meta["name"], {"status": outcome.status}, subresource="status")
        if outcome.status.get("phase") != old.get("phase"):
            log.info("%s/%s: phase %s -> %s", meta["namespace"], meta["name"], old.get("phase"),
                     outcome.status.get("phase"))
    for ev in outcome.events:
        post_event(obj, ev)


# --- kopf handlers --------------------------------------------------------------------------
@kopf.on.resume(*GROUP_VERSION)
@kopf.on.create(*GROUP_VERSION)
@kopf.on.update(*GROUP_VERSION, field="spec")
def on_spec(name: str, namespace: str, **_: Any) -> None:
    reconcile(namespace, name, apply=True)


_CHILD_LABELS = {"app.kubernetes.io/managed-by": common.MANAGED_BY, "app.kubernetes.io/component": builder.COMPONENT}


@kopf.on.event("apps", "v1", "deployments", id="inferenceservice-deployments", labels=_CHILD_LABELS)
def on_deployment(namespace: str, labels: Any, type: str | None, **_: Any) -> None:
    owner = labels.get(common.owner_label(KIND))
    if owner:
        # Status only, so the HPA's replica changes are never fought; a Deployment deleted
        # from under a live InferenceService is created again.
        reconcile(namespace, owner, apply=type == "DELETED")


@kopf.on.event("", "v1", "pods", id="inferenceservice-pods", labels=_CHILD_LABELS)
def on_pod(namespace: str, labels: Any, **_: Any) -> None:
    # A crash-looping server need not change the Deployment's status; its pod does.
    owner = labels.get(common.owner_label(KIND))
    if owner:
        reconcile(namespace, owner, apply=False)


# Last seen (deleted, uid, phase, output uri, completion) of each referenced job: fan out only
# when one changes, not on every progress update of a training run.
_seen: dict[tuple[str, str, str], tuple[Any, ...]] = {}


def _fan_out(kind: str, body: Any, name: str, namespace: str, type_: str | None) -> None:
    status = body.get("status") or {}
    key = (kind, namespace, name)
    seen = (type_ == "DELETED", (body.get("metadata") or {}).get("uid"), status.get("phase"),
            (status.get("output") or {}).get("uri"), status.get("completionTime"))
    if _seen.get(key) == seen:
        return
    _seen[key] = seen
    field_name = "fineTuneJobRef" if kind == "FineTuneJob" else "quantizeJobRef"
    for isvc in kube.list_(KIND, namespace):
        ref = (((isvc.get("spec") or {}).get("model") or {}).get(field_name) or {}).get("name")
        if ref == name:
            log.info("%s/%s: %s %s changed (%s); reconciling", namespace, isvc["metadata"]["name"], kind, name,
                     status.get("phase"))
            reconcile(namespace, isvc["metadata"]["name"], apply=True)


@kopf.on.event(*FineTuneJob.resource(), id="inferenceservice-finetune-inputs")
def on_finetunejob(body: Any, name: str, namespace: str, type: str | None, **_: Any) -> None:
    _fan_out("FineTuneJob", body, name, namespace, type)


@kopf.on.event(*QuantizeJob.resource(), id="inferenceservice-quantize-inputs")
def on_quantizejob(body: Any, name: str, namespace: str, type: str | None, **_: Any) -> None:
    _fan_out("QuantizeJob", body, name, namespace, type)
