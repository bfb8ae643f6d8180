"""The progress poller against what a hostile or broken pod can serve (issue 17, progress poller).

Real HTTP servers on loopback addresses (``http.server`` in a thread) play the rank-0 metrics
endpoint: non-finite values, a redirect to another address, a body trickled a byte at a
time, and a poller round over two jobs of which one serves garbage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubeforge.api.finetune import FineTuneJobSpec
from kubeforge.controllers import finetune, finetune_status, scrape
from kubeforge_runtime import contract

STEP, LOSS, TOTAL = contract.METRIC_STEP, contract.METRIC_LOSS, contract.METRIC_TOTAL_STEPS
SPEC = FineTuneJobSpec.model_validate({"model": {"uri": "hf://acme/tiny@main"}, "dataset": {"uri": "s3://d/t.jsonl"},
                                       "output": {"uri": "s3://m/out"}})


class Served:
    """One server's answers and how often it was asked."""

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler], None]) -> None:
        self.respond, self.hits = respond, 0


@contextmanager
def serve(respond: Callable[[BaseHTTPRequestHandler], None], host: str = "127.0.0.1", port: int = 0
          ) -> Iterator[tuple[str, Served]]:
    """An HTTP server on ``host:port`` whose GET is ``respond(handler)``; yields its base URL."""
    served = Served(respond)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            served.hits += 1
            try:
                served.respond(self)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()


def text(body: str) -> Callable[[BaseHTTPRequestHandler], None]:
    def respond(h: BaseHTTPRequestHandler) -> None:
        data = body.encode()
        h.send_response(200)
        h.send_header("Content-Type", "text/plain; version=0.0.4")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return respond


def test_non_finite_values_are_dropped_and_never_reach_the_status():
    body = f"{STEP} 12\n{TOTAL} 100\n{LOSS} NaN\n{contract.METRIC_TOKENS_PER_SECOND} +Inf\n"
    with serve(text(body)) as (url, _):
        samples = scrape.fetch(f"{url}/metrics")
    assert samples == {STEP: 12.0, TOTAL: 100.0}
    progress = finetune_status.progress_from_metrics(samples, SPEC)
    assert progress == {"step": 12, "totalSteps": 100}
    # Even handed NaN directly, neither the progress nor the status carries it.
    progress = finetune_status.progress_from_metrics({STEP: 12.0, LOSS: float("nan"), TOTAL: float("inf")}, SPEC)
    assert progress == {"step": 12}
    st = finetune_status.compute(
        {"metadata": {"name": "ft", "namespace": "ns", "generation": 1}, "status": {}}, spec=SPEC, job=None, pods=[],
        counted=[], progress={"step": 3, "loss": float("nan")}, now="2026-01-01T00:00:00Z").status
    assert st["progress"] == {"step": 3}


@pytest.mark.parametrize("step", [float("nan"), float("inf"), -1.0, 1e300])
def test_a_step_that_is_not_a_count_is_no_progress(step):
    assert finetune_status.progress_from_metrics({STEP: step, LOSS: 2.0}, SPEC) is None


def test_a_redirect_is_not_followed():
    with serve(text(f"{STEP} 99\n")) as (target, elsewhere):
        def redirect(h: BaseHTTPRequestHandler) -> None:
            h.send_response(302)
            h.send_header("Location", f"{target}/metrics")
            h.send_header("Content-Length", "0")
            h.end_headers()
        with serve(redirect) as (url, pod):
            assert scrape.fetch(f"{url}/metrics") is None
    assert pod.hits == 1 and elsewhere.hits == 0, "the operator was sent to another address"


def test_a_trickling_endpoint_is_cut_off_at_the_total_deadline():
    lines = f"{STEP} 5\n" * 100

    def trickle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(lines)))
        h.end_headers()
        for ch in lines:  # one byte every 50 ms: every single read is fast, the whole is not
            h.wfile.write(ch.encode())
            h.wfile.flush()
            time.sleep(0.05)

    with serve(trickle) as (url, _):
        started = time.monotonic()
        assert scrape.fetch(f"{url}/metrics", timeout=0.5) is None
        assert time.monotonic() - started < 1.0


def test_a_bad_pod_does_not_stop_the_round_for_the_other_jobs(monkeypatch):
    """Two jobs, rank 0 of each on its own loopback address and the contract's (here: a free) port."""
    scheduled: list[tuple[str, str]] = []
    monkeypatch.setattr(finetune.reconciler, "schedule", lambda ns, name, **hints: scheduled.append((ns, name)))
    bad, good = ("ns-scrape", "bad"), ("ns-scrape", "good")
    with serve(text(f"{named(good)}{STEP} 7\n{LOSS} 1.25\n"), host="127.0.0.3") as (good_url, _):
        port = int(good_url.rsplit(":", 1)[1])
        monkeypatch.setattr(contract, "DEFAULT_METRICS_PORT", port)
        with serve(text(f"{named(bad)}{STEP} NaN\n{LOSS} NaN\n"), host="127.0.0.2", port=port):
            try:
                with finetune._tracked_lock:  # the bad one first: its failure would end the round
                    finetune._tracked[bad] = finetune._Tracked("Running", ["127.0.0.2"], SPEC, None)
                    finetune._tracked[good] = finetune._Tracked("Running", ["127.0.0.3"], SPEC, None)
                poller = finetune.Poller(60)
                try:
                    poller.tick()
                    # A failure inside one job's scrape (here: reading its progress) stays that job's.
                    real = finetune_status.progress_from_metrics

                    def broken_for_bad(samples, spec):
                        if samples.get(STEP) is None:
                            raise ValueError("garbage")
                        return real({**samples, STEP: samples[STEP] + 1}, spec)

                    monkeypatch.setattr(finetune_status, "progress_from_metrics", broken_for_bad)
                    poller.tick()
                finally:
                    poller.stop()
                with finetune._tracked_lock:
                    progress = dict(finetune._progress)
            finally:
                finetune._forget(*bad)
                finetune._forget(*good)
    assert bad not in progress
    assert progress[good] == {"step": 8, "loss": 1.25}
    assert scheduled == [good, good]


def named(job: tuple[str, str]) -> str:
    """The line by which a trainer names its job (``contract.METRIC_JOB``)."""
    return f'{contract.METRIC_JOB}{{namespace="{job[0]}",name="{job[1]}"}} 1\n'


def test_progress_is_read_only_from_an_endpoint_that_names_the_job(monkeypatch):
    """Whatever answers on rank 0's IP and port is not the job's trainer unless it says so: a
    process serving every address on this machine (a local trainer's metrics server) answered
    for every benchmark pod's IP and its progress was taken for theirs (README, Operator at scale)."""
    scheduled: list[tuple[str, str]] = []
    monkeypatch.setattr(finetune.reconciler, "schedule", lambda ns, name, **hints: scheduled.append((ns, name)))
    job = ("ns-named", "mine")
    answers = {"body": f"{STEP} 7\n"}
    with serve(lambda h: text(answers["body"])(h), host="127.0.0.4") as (url, served):
        monkeypatch.setattr(contract, "DEFAULT_METRICS_PORT", int(url.rsplit(":", 1)[1]))
        try:
            with finetune._tracked_lock:
                finetune._tracked[job] = finetune._Tracked("Running", ["127.0.0.4"], SPEC, None)
            poller = finetune.Poller(60)
            try:
                seen = []
                for body in (f"{STEP} 7\n",  # names no job
                             f"{named(('ns-named', 'other'))}{STEP} 8\n",  # another job of the namespace
                             f"{named(('other-ns', 'mine'))}{STEP} 9\n",  # the name in another namespace
                             f'{contract.METRIC_JOB}{{namespace="ns-named",name="mine"}} 0\n{STEP} 10\n',
                             f"{named(('ns-named', 'other'))}{named(job)}{STEP} 11\n"):  # this job (among others)
                    answers["body"] = body
                    poller.tick()
                    with finetune._tracked_lock:
                        seen.append((finetune._progress.get(job) or {}).get("step"))
            finally:
                poller.stop()
        finally:
            finetune._forget(*job)
    assert served.hits == 5
    assert seen == [None, None, None, None, 11]
    assert scheduled == [job]


def test_parse_without_a_job_reads_any_endpoint_as_before():
    body = f"{named(('a', 'b'))}{STEP} 3\n"
    assert scrape.parse(body) == {STEP: 3.0}
    assert scrape.parse(body, job=("a", "b")) == {STEP: 3.0}
    assert scrape.parse(body, job=("a", "c")) is None
