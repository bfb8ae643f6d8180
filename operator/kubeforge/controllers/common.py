"""What every kind's reconciler shares: parsing the spec and recording acceptance.

An invalid spec is permanent: it gets ``Accepted=False`` (reason ``InvalidSpec``) with the
validation message and a Warning event, and no retry loop; a new generation of the spec is
looked at afresh. Most invalid specs never get here: the CRD schema and its CEL rules make the
API server reject them first.
"""

from __future__ import annotations

from typing import Any, TypeVar

import kopf
from pydantic import BaseModel, ValidationError

from ..api import describe_validation_error
from .conditions import get_condition, set_condition

M = TypeVar("M", bound=BaseModel)


def parse_spec(model: type[M], spec: Any, body: Any, patch: kopf.Patch, generation: int | None) -> M:
    """Validate ``spec`` into ``model``; on failure record InvalidSpec and raise PermanentError."""
    try:
        parsed = model.model_validate(dict(spec))
    except ValidationError as exc:
        message = describe_validation_error(exc)
        conditions = set_condition(body.get("status", {}).get("conditions"), "Accepted", False,
                                   "InvalidSpec", message, generation)
        patch.status["conditions"] = conditions
        patch.status["observedGeneration"] = generation
        patch.status["phase"] = body.get("status", {}).get("phase") or "Pending"
        kopf.warn(body, reason="InvalidSpec", message=message)
        raise kopf.PermanentError(f"invalid spec: {message}") from None
    return parsed


def mark_accepted(body: Any, patch: kopf.Patch, generation: int | None, conditions: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Set Accepted=True for this generation; post an event the first time."""
    current = conditions if conditions is not None else body.get("status", {}).get("conditions")
    before = get_condition(current, "Accepted")
    out = set_condition(current, "Accepted", True, "Accepted", "spec is valid", generation)
    if not before or before.get("status") != "True":
        kopf.info(body, reason="Accepted", message=f"generation {generation} accepted")
    patch.status["conditions"] = out
    patch.status["observedGeneration"] = generation
    return out
