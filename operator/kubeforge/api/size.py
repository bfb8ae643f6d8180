"""How big a KubeForge resource may be: the spec must fit kopf's bookkeeping.

kopf keeps a copy of the spec in the object's ``kopf.zalando.org/last-handled-configuration``
annotation, and the API server allows 256 KiB of annotations per object. A bigger spec would
be stored, and then every patch kopf makes to the object would fail with 422 (retried, with a
traceback each time, and the object never handled). The API models bound the fields that can
grow on their own (``template.env`` values, ``template.annotations``); the schemaless parts of
``spec.template`` (volumes, affinity, tolerations) and the sum of everything can only be
measured on the whole object, which the admission webhook does
(:mod:`kubeforge.controllers.webhooks`) and the operator does again before it acts
(:func:`kubeforge.controllers.reconcile.check_policy`).
"""

from __future__ import annotations

import json
from typing import Any

SPEC_BUDGET_BYTES = 192 * 1024
"""The most bytes of JSON that a spec and the object's own annotations may take together: kopf
copies the spec into an annotation, and all annotations share the API server's 256 KiB; the rest
is headroom for kopf's other annotations and the operator's own."""

ENV_VALUE_MAX = 32 * 1024
"""Longest literal value of one ``template.env`` entry (a larger value belongs in a ConfigMap)."""
ANNOTATION_VALUE_MAX = 32 * 1024
"""Longest value of one ``template.annotations`` entry."""
MAP_ENTRIES_MAX = 64
"""Most entries of ``template.labels``, ``template.annotations`` and ``template.nodeSelector``."""


def spec_size(body: dict[str, Any]) -> int:
    """Bytes of the spec as kopf stores it (compact JSON) plus those of the object's annotations."""
    spec = json.dumps(body.get("spec") or {}, separators=(",", ":"), ensure_ascii=False).encode()
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return len(spec) + sum(len(str(k).encode()) + len(str(v).encode()) for k, v in annotations.items())


def size_problem(body: dict[str, Any], budget: int = SPEC_BUDGET_BYTES) -> str | None:
    """The refusal for a spec (with the object's annotations) over ``budget`` bytes; None when fine."""
    size = spec_size(body)
    if size <= budget:
        return None
    return (f"spec: {size // 1024} KiB with metadata.annotations, over the {budget // 1024} KiB a KubeForge "
            f"resource may take (the operator keeps a copy of the spec in an annotation, and the API server "
            f"allows 256 KiB of annotations): move large values into a ConfigMap or Secret and reference it "
            f"(valueFrom, volumes)")
