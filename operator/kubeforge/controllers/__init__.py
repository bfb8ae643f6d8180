"""The kopf operator: one module of handlers per kind, on one shared reconcile loop.

Each kind has the same rooms: ``<kind>.py`` (thin kopf handlers and the kind's read/apply
step), ``<kind>_status.py`` (its status from what was read: pure, table-tested), and the
shared machinery in :mod:`.reconcile` (serialised, debounced syncs, accept/reject, the
resourceVersion-guarded status write, ownership, reference fan-out, operator metrics,
forgetting deleted objects). Handlers are thin: read, call the pure status function,
apply, write status and events.

Importing this package registers the handlers with kopf's default registry; nothing else
in ``kubeforge`` imports it (the SDK, the CLI's offline commands and ``manifests`` do not).
"""

from . import finetune, inference, quantize, session, settings  # noqa: F401  (registers handlers)
