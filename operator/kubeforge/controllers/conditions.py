"""Status conditions and phases, by the Kubernetes API conventions (pure functions).

A condition's ``lastTransitionTime`` changes only when its ``status`` changes, so re-running
a reconcile with the same outcome leaves the status byte-for-byte the same (no update storm).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


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
