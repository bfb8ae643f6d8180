"""Resolving ``fineTuneJobRef`` / ``quantizeJobRef``: is the referenced output there yet?

Called by the QuantizeJob and InferenceService reconcilers. :func:`resolve` is pure (it
takes the referenced object as read from the API, or ``None``), so every outcome is unit
tested; :func:`resolve_model` takes the read as a function (the controllers pass
``kube.get``).

A referenced job is *ready* when its ``status.phase`` is ``Succeeded`` and it reports
``status.output.uri``. Its *revision* identifies that output: the job's UID, the URI and the
completion time, hashed. Re-creating the job under the same name (new UID) or a new output
URI gives a new revision even when the URI string is unchanged, because the bytes behind
it are new; the InferenceService rolls its pods on a new revision.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Literal

State = Literal["ready", "waiting", "failed", "missing"]


@dataclass(frozen=True)
class Resolution:
    """What a reference currently yields."""

    state: State
    """ready: use ``uri``; waiting: not finished yet (or not there yet); failed: it failed."""
    uri: str | None = None
    revision: str | None = None
    reason: str = ""
    """CamelCase reason for a condition: InputReady, WaitingForInput, InputFailed."""
    message: str = ""


def revision_of(uri: str, source: str = "", uid: str = "", completed: str = "") -> str:
    """A short, stable identifier of one model output (12 hex digits)."""
    blob = json.dumps({"uri": uri, "source": source, "uid": uid, "completed": completed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def resolve_uri(uri: str) -> Resolution:
    """A model given directly by URI: always ready; its revision is the URI's."""
    return Resolution("ready", uri=uri, revision=revision_of(uri), reason="InputReady", message=f"model {uri}")


def resolve(kind: str, name: str, obj: dict[str, Any] | None) -> Resolution:
    """What the referenced ``kind``/``name`` (``obj``, None when absent) yields now."""
    what = f"{kind} {name}"
    if obj is None:
        # Not an error: a GitOps tool may apply the consumer before the producer.
        return Resolution("missing", reason="WaitingForInput",
                          message=f"waiting for {what}: it does not exist (yet)")
    status = obj.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase == "Succeeded":
        uri = (status.get("output") or {}).get("uri")
        if not uri:
            return Resolution("failed", reason="InputFailed",
                              message=f"{what} succeeded but reports no status.output.uri")
        meta = obj.get("metadata") or {}
        revision = revision_of(uri, f"{kind}/{name}", meta.get("uid", ""), status.get("completionTime") or "")
        return Resolution("ready", uri=uri, revision=revision, reason="InputReady",
                          message=f"using the output of {what}: {uri}")
    if phase == "Failed":
        detail = _failure_detail(status)
        return Resolution("failed", reason="InputFailed",
                          message=f"{what} failed{': ' + detail if detail else ''}; fix it and re-create it, "
                                  f"or point model at another source")
    return Resolution("waiting", reason="WaitingForInput",
                      message=f"waiting for {what} to succeed (it is {phase})")


REFERENCE_FIELDS = {"fine_tune_job_ref": ("FineTuneJob", "fineTuneJobRef"),
                    "quantize_job_ref": ("QuantizeJob", "quantizeJobRef")}
"""Python attribute of a model source -> (the kind it references, its field name in a spec)."""


def resolve_model(model: Any, get: Callable[[str, str], dict[str, Any] | None]) -> Resolution:
    """What a spec's ``model`` (``uri``, ``fineTuneJobRef`` or ``quantizeJobRef``) yields now.

    ``get(kind, name)`` reads the referenced object (None when absent); it is only called
    for a reference.
    """
    if getattr(model, "uri", None) is not None:
        return resolve_uri(model.uri)
    for attr, (kind, _field) in REFERENCE_FIELDS.items():
        ref = getattr(model, attr, None)
        if ref is not None:
            return resolve(kind, ref.name, get(kind, ref.name))
    raise ValueError("the model names no source")  # the API models guarantee exactly one


def _failure_detail(status: dict[str, Any]) -> str:
    """The reason and message of the referenced job's Failed condition, if it has one."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            reason, message = cond.get("reason", ""), cond.get("message", "")
            return f"{reason}: {message}".strip(": ") if message else reason
    return ""
