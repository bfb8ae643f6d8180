"""InferenceService reconciler (skeleton: validation and acceptance)."""

from __future__ import annotations

from typing import Any

import kopf

from ..api.inference import InferenceServiceSpec
from .common import mark_accepted, parse_spec

GROUP_VERSION = ("kubeforge.io", "v1alpha1", "inferenceservices")


@kopf.on.resume(*GROUP_VERSION)
@kopf.on.create(*GROUP_VERSION)
@kopf.on.update(*GROUP_VERSION, field="spec")
def reconcile(spec: Any, body: Any, meta: Any, status: Any, patch: kopf.Patch, **_: Any) -> None:
    generation = meta.get("generation")
    parse_spec(InferenceServiceSpec, spec, body, patch, generation)
    mark_accepted(body, patch, generation)
    if not status.get("phase"):
        patch.status["phase"] = "Pending"
