"""InferenceService status from what the cluster shows: pure functions, tested without a cluster.

Called by :mod:`kubeforge.controllers.inference` on every sync of an InferenceService, with
the objects read from the API: :func:`validate` checks what the schema cannot (the name must
be a DNS-1035 label, since it names the Service; adapter names must be unique and differ
from it); :func:`compute` returns the status from what the model reference yields, the
Deployment and, while it rolls out, its pods: ``phase``, conditions ``Accepted`` /
``ModelReady`` / ``Ready`` (reasons such as ``WaitingForInput``, ``InputFailed``,
``Loading``, ``ModelLoadFailed``, ``ModelLoaded``, ``Serving``), ``url``,
``replicas {ready, desired}``, ``modelUri``, ``modelRevision``, ``observedGeneration``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from ..api import InvalidSpec
from ..api.inference import InferenceService, InferenceServiceSpec
from ..builders import inference as builder
from .conditions import Event, Outcome, accept, get_condition, set_condition
from .references import Resolution

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Container states that mean the model server cannot start as configured.
_BAD_WAITING = {"CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError",
                "CreateContainerError", "InvalidImageName", "RunContainerError"}


def validate(obj: dict[str, Any]) -> InferenceServiceSpec:
    """The typed spec, or ValidationError/InvalidSpec."""
    spec = InferenceServiceSpec.model_validate(obj.get("spec") or {})
    name = (obj.get("metadata") or {}).get("name", "")
    if len(name) > 63 or not _DNS_1035.match(name):
        raise InvalidSpec(f"metadata.name {name!r} must be a DNS-1035 label (lower-case letters, digits and '-', "
                          f"starting with a letter, at most 63 characters): it names the Service")
    try:
        InferenceService.validate_object(name, spec)  # adapter names (the CRD's CEL refuses them too)
    except ValueError as exc:
        raise InvalidSpec(str(exc)) from None
    return spec


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


def compute(obj: dict[str, Any], *, resolution: Resolution, deployment: dict[str, Any] | None,
            pods: list[dict[str, Any]], now: str) -> Outcome:
    """The InferenceService's next status from ``obj`` (as read, with its current status),
    what its model yields (``resolution``), its Deployment (None: not created) and, while a
    rollout is under way, its pods."""
    meta = obj.get("metadata") or {}
    name, namespace, generation = meta.get("name", ""), meta.get("namespace", ""), meta.get("generation")
    old = obj.get("status") or {}
    st = copy.deepcopy(old)
    conds, events = accept(st.get("conditions"), generation, now)
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
    conds = set_condition(conds, "ModelReady", mr[0], mr[1], mr[2], generation, now)
    conds = set_condition(conds, "Ready", rd[0], rd[1], rd[2], generation, now)
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
