"""kopf's last-handled-configuration storage, without copying what it throws away.

kopf builds an object's *essence* (spec, labels and its own annotations: what its change
handlers diff) on **every** watch event of **every** resource it watches, handlers or not:
``DiffBaseStorage.build`` deep-copies the whole body (status and ``managedFields``
included), then deletes ``metadata`` and ``status``, and the progress storage deep-copies the
result once more. For the operator's children (Jobs, pods, Deployments), which only have
event handlers, that essence is computed and never used; it was the largest single share of
the operator's CPU in ``benchmarks/bench_operator.py`` (about a sixth, py-spy ``--gil``, 200
FineTuneJobs: mostly the workers' pod events).

:class:`LeanDiffBaseStorage` is kopf's :class:`kopf.AnnotationsDiffBaseStorage` with two
changes in ``build`` only (``fetch`` and ``store``, so what is written on objects, are kopf's):

* for a KubeForge kind (the only ones with change handlers: a test keeps it so), the same
  essence, built from the spec and the labels and annotations instead of a copy of the whole
  body (a test compares it with kopf's own);
* for any other kind, an empty essence: kopf compares essences only for change and spawning
  (daemon, timer) handlers, and the operator registers those for its own kinds only.
"""

from __future__ import annotations

from typing import Any, Iterable

import kopf

from ..api import GROUP

_NOT_COPIED = ("metadata", "status")
"""Stanzas kopf's ``build`` copies whole, then deletes (of ``metadata`` it keeps the labels and annotations)."""


def owned(body: Any) -> bool:
    """Whether ``body`` is one of the KubeForge kinds (``<GROUP>/<version>``)."""
    return str(body.get("apiVersion") or "").split("/", 1)[0] == GROUP


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """:class:`kopf.AnnotationsDiffBaseStorage` whose ``build`` copies only what it keeps."""

    def build(self, *, body: Any, extra_fields: Iterable[Any] | None = None) -> Any:
        extra = list(extra_fields or [])
        if not owned(body):
            return {}
        if any(_outside_spec(f) for f in extra):
            return super().build(body=body, extra_fields=extra)  # a handler watches a status field
        meta = body.get("metadata") or {}
        lean: dict[str, Any] = {k: v for k, v in body.items() if k not in _NOT_COPIED}
        lean["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        # kopf's own build on the lean body: it deep-copies only the spec, labels and annotations.
        return super().build(body=kopf.Body(lean), extra_fields=extra)


def _outside_spec(field: Any) -> bool:
    path = field.split(".") if isinstance(field, str) else list(field)
    return not path or path[0] != "spec"
