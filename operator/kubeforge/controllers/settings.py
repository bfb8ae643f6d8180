"""Operator-wide settings: kopf's, and the platform's policies read from the environment.

The workload policy (:func:`workload_policy`: which ``spec.template`` pass-throughs are
allowed) and the NetworkPolicy settings (:func:`network_policy_settings`) come from
``KUBEFORGE_*`` environment variables, which the Helm chart fills from its
``workloadPolicy`` and ``networkPolicy`` values; unset variables mean the defaults
(the narrowest policy, NetworkPolicies on). They are read on every call (cheap), so a test
or a restart with a new environment needs no cache to be cleared.

kopf's own bookkeeping (handler progress, the last-handled spec) goes into annotations under
``kubeforge.io/`` rather than into ``status``: the CRDs' status schemas are structural and
would prune unknown keys, and status belongs to the user-facing API. The operator never
writes to ``spec``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from .. import kube
from ..api import GROUP
from ..api import policy
from ..builders import network
from .essence import LeanDiffBaseStorage


CONSISTENCY_TIMEOUT_SECONDS = 60.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    # kopf's annotation, built without copying what kopf discards (:mod:`.essence`).
    settings.persistence.diffbase_storage = LeanDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # kopf posts a Kubernetes Event for each of its log lines about an object at this level or
    # above. At INFO that is "Handler 'on_spec' succeeded." and "Creation is processed: 1
    # succeeded; 0 failed." on every new object: two API writes each, saying nothing the
    # object's own events (Accepted, Created, the phases) and conditions do not. Handler
    # failures (kopf logs them as warnings and errors) are still posted.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    # After its own annotation patch, kopf holds an object's change handlers until the watch
    # brings the patched version back, for at most this long; then it takes the older version it
    # has for current, finds no last-handled configuration there and runs the creation handler
    # again (a second apply of every child). Under load the watch lags by more than kopf's 5 s
    # default: most of 40 FineTuneJobs created at once were "created" twice on a busy machine.
    settings.persistence.consistency_timeout = CONSISTENCY_TIMEOUT_SECONDS
    settings.peering.name = "kubeforge"
    settings.peering.mandatory = False
    kube.load_config()


def workload_policy() -> policy.WorkloadPolicy:
    """The platform's workload policy (``KUBEFORGE_ALLOWED_VOLUME_TYPES``, ``KUBEFORGE_ALLOW_*``)."""
    return policy.from_env(dict(os.environ))


def network_policy_settings() -> network.NetworkPolicySettings:
    """Whether and how workloads get NetworkPolicies (``KUBEFORGE_NETWORK_POLICIES``, ...)."""
    return network.settings_from_env(dict(os.environ))
