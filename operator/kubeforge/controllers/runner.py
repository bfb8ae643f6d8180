"""Run the operator: ``kubeforge operator`` and ``python -m kubeforge operator``.

Besides the reconcilers, two deployment concerns are wired here from command-line options
(the Helm chart passes them):

* **High availability by kopf peering.** With ``--peering NAME`` every replica joins the
  peering object ``NAME`` (a ``ClusterKopfPeering`` when cluster-wide, a ``KopfPeering`` in
  each watched namespace otherwise; the chart creates them). kopf pauses every operator that
  sees a live peer of *higher or equal* priority, so equal priorities would pause all
  replicas. Each replica therefore gets a distinct priority that falls with its start time:
  the oldest live replica is the active one, a newly started replica (a rolling update, a
  rescheduled pod) waits behind it instead of pre-empting it. Peering is made mandatory, so a
  replica starts paused and only resumes once it has read the peering object and found no
  live peer above it; a replica that dies without saying goodbye (SIGKILL, node loss) is
  considered gone after ``--peering-lifetime`` seconds and the next one resumes. The
  operator's own threads (the FineTuneJob poller, scheduled syncs) follow the same rule
  through :mod:`.peering`, which is told this replica's identity (``POD_ID``, else one made
  here and given to kopf too) and priority.
* **Metrics** (``--metrics-port``): the Prometheus default registry over HTTP.
* **The validating admission webhook** (``--webhook-port``): kopf serves
  :mod:`kubeforge.controllers.webhooks` over HTTPS with the certificate the chart mounts.
  kopf (>= 1.41) re-reads the certificate files every ``--webhook-cert-check-seconds`` and
  restarts only its HTTPS listener when they change, so a renewed certificate (cert-manager,
  or a rotated Secret the kubelet has synced) is served without restarting the operator.
  The ValidatingWebhookConfiguration is the chart's (kopf does not manage it), so the
  operator needs no permission on admission configuration.
"""

from __future__ import annotations

import getpass
import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WebhookOptions:
    """Where and how the admission webhook server listens."""

    port: int
    cert_file: str | None = None
    key_file: str | None = None
    addr: str = "0.0.0.0"
    host: str | None = None
    cert_check_seconds: float = 10.0
    """How often the server re-reads the certificate files (kopf's default: 60 s)."""


class ObjectFormatter(logging.Formatter):
    """Prefixes kopf's per-object records with ``[Kind namespace/name]``.

    kopf attaches the object to its handler log records (``k8s_ref``) but its messages
    ("Handler 'reconcile' succeeded.") do not name it; without the prefix, logs of several
    objects, or of several replicas, cannot be told apart.
    """

    def format(self, record: logging.LogRecord) -> str:
        ref = getattr(record, "k8s_ref", None)
        if ref:
            where = f"{ref.get('namespace')}/{ref.get('name')}" if ref.get("namespace") else ref.get("name")
            record = logging.makeLogRecord({**record.__dict__, "msg": f"[{ref.get('kind', '')} {where}] {record.msg}"})
        return super().format(record)


class QuietEventHandlers(logging.Filter):
    """Drops kopf's "Handler 'x' succeeded." / "Indexer 'x' succeeded." lines of the event-watching
    handlers and indexers named in ``ids``.

    Those run on every event of every pod, Job and custom object (a few per second per job while
    workers come up) and said nothing else: about nine lines in ten of a busy operator's log,
    formatted and written on kopf's event loop, the one thread that also reads every watch. The
    change handlers' lines ("Handler 'on_spec' succeeded.", "Creation is processed ..."), every
    warning and error, and everything under ``-v`` are kept.
    """

    def __init__(self, ids: set[str]) -> None:
        super().__init__()
        self._quiet = {f"Handler {i!r} succeeded." for i in ids} | {f"Indexer {i!r} succeeded." for i in ids}

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.msg in self._quiet)


def event_handler_ids(registry: Any) -> set[str]:
    """The ids of the event-watching handlers and indexers in kopf's ``registry`` (empty when this
    kopf keeps them elsewhere: then nothing is filtered)."""
    ids: set[str] = set()
    for part in ("_watching", "_indexing"):
        try:
            ids |= {str(h.id) for h in getattr(registry, part).get_all_handlers()}
        except AttributeError:
            return set()
    return ids


def start_time_priority(now: float | None = None) -> int:
    """A peering priority that is lower the later the replica started (the oldest one wins).

    Milliseconds since the epoch, negated, times 1000 plus a random tail: two replicas that
    start in the same millisecond still get distinct priorities (equal ones would pause both).
    The value stays well inside int64, as the Kubernetes API stores it.
    """
    ms = int((time.time() if now is None else now) * 1000)
    return -(ms * 1000 + random.randrange(1000))


def own_identity() -> str:
    """This replica's peering identity: the pod name (``POD_ID``, set by the chart), else
    ``user@host/pid`` (kopf's own fallback has a random part this process could not know)."""
    return os.environ.get("POD_ID") or f"{getpass.getuser()}@{socket.gethostname()}/{os.getpid()}"


def run_operator(namespaces: list[str] | None, *, liveness_port: int | None = None,
                 standalone: bool = False, peering: str | None = None, verbose: bool = False,
                 peering_priority: int | None = None, peering_lifetime: int | None = None,
                 webhook: WebhookOptions | None = None, metrics_port: int | None = None) -> None:
    import kopf

    import kubeforge.controllers  # noqa: F401  (registers the handlers)
    from . import peering as peering_gate
    from . import session

    if webhook is not None:
        from . import webhooks  # noqa: F401  (registers the admission handlers)

    handler = logging.StreamHandler()
    handler.setFormatter(ObjectFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    if not verbose:
        logging.getLogger("kopf.objects").addFilter(QuietEventHandlers(event_handler_ids(kopf.get_default_registry())))
    session.configure(namespaces)  # kopf's connection pool, sized for the watch streams

    if metrics_port:
        # Prometheus exposition of the default registry: process metrics plus whatever the
        # reconcilers register; a daemon thread, so it never holds up shutdown.
        import prometheus_client

        prometheus_client.start_http_server(metrics_port)

    priority = None
    identity = own_identity()
    if peering and not standalone:
        priority = peering_priority if peering_priority is not None else start_time_priority()
        peering_gate.configure(peering_gate.PeeringConfig(name=peering, identity=identity, priority=priority,
                                                          namespaces=tuple(namespaces or ())))

    # Registered after kubeforge.controllers.settings.configure, so it runs after it and the
    # command line wins over the operator-wide defaults set there.
    @kopf.on.startup()
    def apply_command_line(settings: kopf.OperatorSettings, **_: Any) -> None:
        if peering and not standalone:
            settings.peering.name = peering
            settings.peering.mandatory = True
            settings.peering.priority = priority
            if peering_lifetime:
                settings.peering.lifetime = peering_lifetime
            logging.getLogger(__name__).info(
                "peering %r: priority %d, lifetime %ds", peering, priority, settings.peering.lifetime)
        if webhook is not None:
            settings.admission.server = kopf.WebhookServer(
                addr=webhook.addr, port=webhook.port, host=webhook.host,
                certfile=webhook.cert_file, pkeyfile=webhook.key_file,
                file_check_interval=webhook.cert_check_seconds,
            )
            settings.admission.managed = None  # the chart owns the webhook configuration

    kwargs: dict[str, Any] = {}
    if liveness_port:
        kwargs["liveness_endpoint"] = f"http://0.0.0.0:{liveness_port}/healthz"
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces or [],
        standalone=standalone,
        peering_name=peering,
        priority=priority,
        identity=identity,  # type: ignore[arg-type]  (kopf's Identity is a NewType of str)
        **kwargs,
    )
