"""Operator-wide kopf settings.

kopf's own bookkeeping (handler progress, the last-handled spec) goes into annotations under
``kubeforge.io/`` rather than into ``status``: the CRDs' status schemas are structural and
would prune unknown keys, and status belongs to the user-facing API. The operator never
writes to ``spec``.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from .. import kube
from ..api import GROUP


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    settings.peering.name = "kubeforge"
    settings.peering.mandatory = False
    kube.load_config()
