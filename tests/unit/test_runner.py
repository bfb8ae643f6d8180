"""The operator runner's deployment options: HA priorities, object-prefixed logs, CLI flags."""

from __future__ import annotations

import logging

from kubeforge.cli import build_parser
from kubeforge.controllers.runner import ObjectFormatter, start_time_priority


def test_priority_falls_with_start_time_and_never_ties():
    # kopf pauses every replica that sees a live peer of higher *or equal* priority, so two
    # replicas must never tie, and the older one must win.
    older = start_time_priority(now=1_800_000_000.000)
    newer = start_time_priority(now=1_800_000_000.001)
    assert older > newer
    same_ms = {start_time_priority(now=1_800_000_000.0) for _ in range(50)}
    assert len(same_ms) > 1
    assert -(2**63) < min(same_ms) < 0  # fits the int64 the API server stores


def test_object_formatter_names_the_object():
    fmt = ObjectFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, "Handler 'reconcile' succeeded.", None, None)
    record.k8s_ref = {"kind": "FineTuneJob", "namespace": "ml", "name": "ft"}
    assert fmt.format(record) == "INFO [FineTuneJob ml/ft] Handler 'reconcile' succeeded."
    plain = logging.LogRecord("kopf", logging.INFO, __file__, 1, "started", None, None)
    assert fmt.format(plain) == "INFO started"


def test_operator_flags_the_chart_passes_parse():
    args = build_parser().parse_args([
        "operator", "--liveness-port=8081", "--metrics-port=8080", "--peering=kubeforge", "--peering-lifetime=30",
        "--namespace=a", "--namespace=b", "--webhook-port=9443", "--webhook-cert-file=/c/tls.crt",
        "--webhook-key-file=/c/tls.key"])
    assert (args.peering, args.peering_lifetime, args.namespace) == ("kubeforge", 30, ["a", "b"])
    assert (args.webhook_port, args.webhook_cert_file, args.metrics_port) == (9443, "/c/tls.crt", 8080)


def test_event_handler_success_lines_are_dropped_and_change_handler_lines_kept():
    import kopf

    from kubeforge.controllers.runner import QuietEventHandlers, event_handler_ids

    import kubeforge.controllers  # noqa: F401  (registers the handlers)

    ids = event_handler_ids(kopf.get_default_registry())
    assert {"pod_event", "job_event", "finetunejob-deleted", "finetunejob_references"} <= ids
    assert "on_spec" not in ids and not any(i.endswith("on_spec") for i in ids)
    quiet = QuietEventHandlers(ids)

    def line(msg: str, level: int = logging.INFO) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, msg, None, None)

    assert not quiet.filter(line("Handler 'pod_event' succeeded."))
    assert not quiet.filter(line("Indexer 'finetunejob_references' succeeded."))
    assert quiet.filter(line("Handler 'on_spec' succeeded."))
    assert quiet.filter(line("Creation is processed: 1 succeeded; 0 failed."))
    assert quiet.filter(line("Handler 'pod_event' succeeded.", logging.WARNING))
