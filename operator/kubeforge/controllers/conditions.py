"""What every kind's status is made of, by the Kubernetes API conventions (pure functions).

Conditions, the :class:`Event` and :class:`Outcome` values the ``<kind>_status`` modules
return, and the two verdicts on a spec every kind shares: :func:`accept` and :func:`reject`.

A condition's ``lastTransitionTime`` changes only when its ``status`` changes, so re-running
a reconcile with the same outcome leaves the status byte-for-byte the same (no update storm).
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Iterable

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass
class Event:
    """One event to post: ``type`` is Normal or Warning, ``reason`` one CamelCase word."""

    type: str
    reason: str
    message: str


@dataclass
class Outcome:
    """What a pure status function concluded: the whole new status and the events to post."""

    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(
    conditions: Iterable[dict[str, Any]] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str = "",
    generation: int | None = None,
    at: str | None = None,
) -> list[dict[str, Any]]:
    """Return ``conditions`` with ``type_`` set; keeps the order and the others untouched."""
    status_s = status if isinstance(status, str) else ("True" if status else "False")
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions or []:
        if cond.get("type") != type_:
            out.append(dict(cond))
            continue
        found = True
        changed = cond.get("status") != status_s
        new = {
            "type": type_, "status": status_s, "reason": reason, "message": message,
            "lastTransitionTime": (at or now()) if changed else cond.get("lastTransitionTime", at or now()),
        }
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    if not found:
        new = {"type": type_, "status": status_s, "reason": reason, "message": message,
               "lastTransitionTime": at or now()}
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    return out


def get_condition(conditions: Iterable[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: Iterable[dict[str, Any]] | None, type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return bool(cond and cond.get("status") == "True")


def true_condition(obj: dict[str, Any] | None, *types: str) -> dict[str, Any] | None:
    """The first condition of ``obj.status`` of one of ``types`` whose status is True."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") in types and cond.get("status") == "True":
            return cond
    return None


def accept(conditions: Iterable[dict[str, Any]] | None, generation: int | None,
           at: str | None = None) -> tuple[list[dict[str, Any]], list[Event]]:
    """``Accepted=True`` for ``generation``, and the ``Accepted`` event once per generation."""
    before = get_condition(conditions, "Accepted") or {}
    out = set_condition(conditions, "Accepted", True, "Accepted", "spec is valid", generation, at)
    if before.get("status") == "True" and before.get("observedGeneration") == generation:
        return out, []
    return out, [Event("Normal", "Accepted", f"generation {generation} accepted")]


def reject(obj: dict[str, Any], message: str, at: str | None = None, reason: str = "InvalidSpec") -> Outcome:
    """``Accepted=False`` (``InvalidSpec``, or ``reason``) with ``message``; the phase stays (or is Pending).

    An invalid spec is permanent for its generation: nothing is created or changed, and the
    Warning event is posted once per distinct message, not on every retry.
    """
    generation = (obj.get("metadata") or {}).get("generation")
    old = obj.get("status") or {}
    status = copy.deepcopy(old)
    before = get_condition(status.get("conditions"), "Accepted") or {}
    status["conditions"] = set_condition(status.get("conditions"), "Accepted", False, reason, message,
                                         generation, at)
    status["observedGeneration"] = generation
    status["phase"] = old.get("phase") or "Pending"
    events = []
    if before.get("reason") != reason or before.get("message") != message:
        events.append(Event("Warning", reason, message))
    return Outcome(status, events)


def child_conflict(obj: dict[str, Any], message: str, at: str | None = None) -> Outcome:
    """``Accepted=False/ChildConflict``: an object with a child's name belongs to someone else.

    Like :func:`reject`, nothing is created or changed and the Warning event is posted once
    per distinct message; unlike it, the spec is fine, so the next sync after the object is
    gone goes on as usual (and sets ``Accepted=True`` again).
    """
    return reject(obj, message, at, reason="ChildConflict")
