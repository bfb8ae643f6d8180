"""Read a workload's Prometheus endpoint: how the operator learns training progress.

Workload pods have no API token, so they cannot report to the API server; the trainer's
rank 0 serves gauges (names in ``kubeforge_runtime.contract``) and the operator reads them.
Called by :mod:`kubeforge.controllers.finetune`'s progress poller. Every failure (refused,
timed out, not Prometheus text) yields None and no log line: progress is a nicety and an
unreachable endpoint must never stall or fail a reconcile.

What a pod serves is not trusted, since anyone who can run a pod can serve anything:

* one request, one **total deadline** (connect, headers and body together), not a timeout
  per read: a pod that trickles a byte a second cannot hold a poller round for longer;
* **no redirects** (and no proxies): a 3xx is an unreadable answer, so a pod cannot point
  the operator at another address inside the cluster (a blind SSRF from the operator's
  network position);
* at most ``MAX_BYTES`` read; only **finite** values kept (NaN and ±Inf are dropped: the API
  server refuses them in a status, and a job whose status cannot be written never finishes);
* with ``job``, only an endpoint that **names that job** is read (``contract.METRIC_JOB``,
  labels ``namespace`` and ``name``, from the environment the operator sets on the workers):
  whatever else answers on a pod's IP and port (another job's trainer after an IP is reused, a
  process on the node serving every address) is not taken for that job's progress.
"""

from __future__ import annotations

import http.client
import math
import socket
import time
import urllib.parse

from prometheus_client.parser import text_string_to_metric_families

from kubeforge_runtime import contract

DEFAULT_TIMEOUT = 1.0
MAX_BYTES = 1 << 20
_CHUNK = 16 << 10


class _Deadline(Exception):
    """The scrape's total time is up."""


def parse(text: str, prefix: str = "kubeforge_", job: tuple[str, str] | None = None) -> dict[str, float] | None:
    """Unlabelled, finite samples whose name starts with ``prefix``: ``{name: value}``; with
    ``job`` (namespace, name), None unless ``text`` names that job (``contract.METRIC_JOB`` 1)."""
    out: dict[str, float] = {}
    named = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if job is not None and sample.name == contract.METRIC_JOB and sample.value == 1:
                named = named or (sample.labels.get("namespace"), sample.labels.get("name")) == job
            elif sample.name.startswith(prefix) and not sample.labels:
                value = float(sample.value)
                if math.isfinite(value):
                    out[sample.name] = value
    return out if job is None or named else None


def _read_body(url: str, deadline: float) -> bytes | None:
    """GET ``url`` (plain http) by ``deadline`` (a monotonic time): the body of a 200, else None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return None

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline
        return remaining

    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=left())
    try:
        conn.request("GET", parts.path or "/", headers={"Accept": "text/plain"})
        sock = conn.sock  # kept: the connection forgets it once the response says it will close
        if sock is None:
            return None
        sock.settimeout(left())
        resp = conn.getresponse()
        if resp.status != 200:  # a redirect included: never followed
            return None
        body = bytearray()
        while len(body) < MAX_BYTES:
            # Each read may block only for what is left of the whole scrape's time.
            sock.settimeout(left())
            chunk = resp.read1(min(_CHUNK, MAX_BYTES - len(body)))
            if not chunk:
                break
            body += chunk
        left()  # the last read may have returned just as time ran out
        return bytes(body)
    finally:
        conn.close()


def fetch(url: str, timeout: float = DEFAULT_TIMEOUT, job: tuple[str, str] | None = None) -> dict[str, float] | None:
    """The samples at ``url`` (``http://ip:port/metrics``) read within ``timeout`` seconds in
    all, or None when unreachable, redirected, too slow, unreadable or (``job``: its namespace
    and name) not that job's."""
    try:
        body = _read_body(url, time.monotonic() + timeout)
        return None if body is None else parse(body.decode("utf-8", "replace"), job=job)
    except (_Deadline, OSError, socket.timeout, http.client.HTTPException, ValueError):
        # No log line here: it would repeat every poll for every job; the caller logs changes.
        return None
