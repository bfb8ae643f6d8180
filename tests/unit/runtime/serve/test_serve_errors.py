"""Error responses never carry exception text: the probes answer without a key, and an
exception may name paths, hosts or another request's data. Real servers over real HTTP."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubeforge_runtime.serve import app as app_mod
from kubeforge_runtime.serve import server as server_mod
from kubeforge_runtime.serve.config import parse_config
from kubeforge_runtime.serve.server import ServerThread

from support.serving import make_config

SECRET = "s3cr3t-internal-host.example:/var/lib/private"


def test_a_failed_load_is_not_described_to_the_probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(server_mod, "LOAD_FAILED_EXIT_DELAY_S", 60.0)  # keep serving while we look
    monkeypatch.setenv("KUBEFORGE_REPORT_PATH", str(tmp_path / "termination-log"))
    missing = tmp_path / SECRET.replace(":", "_")
    server = ServerThread(parse_config(make_config(missing, name="broken")))
    try:
        with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="failed to load"):
            server.start(wait_ready=60)
        for probe in ("/health", "/ready"):
            r = httpx.get(server.base_url + probe, timeout=10)
            assert r.status_code == 503, (probe, r.text)
            assert r.json()["error"]["message"] == app_mod.LOAD_FAILED_MESSAGE
            assert "s3cr3t" not in r.text and str(tmp_path) not in r.text
        assert "s3cr3t" in caplog.text  # the detail is in the server's log
    finally:
        server.stop()


@pytest.fixture
def faulty(start_server: Callable[..., ServerThread], tiny_model: Path) -> ServerThread:
    """A server whose model raises on every forward pass after warm-up (fault injection in the
    real model, so the failure takes the real engine path to a 500)."""
    server = start_server(make_config(tiny_model, name="faulty", batching="dynamic", maxConcurrentRequests=2))
    model = server.runtime.models["faulty"].engine._model

    def broken_forward(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"CUDA-ish failure reading {SECRET}")

    model.forward = broken_forward
    return server


def test_a_500_says_nothing_of_the_exception(faulty: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    body = {"model": "faulty", "prompt": "hello", "max_tokens": 4}
    with caplog.at_level(logging.ERROR):
        r = httpx.post(faulty.base_url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 500, r.text
    assert r.json()["error"]["message"] == app_mod.INTERNAL_ERROR_MESSAGE
    assert "s3cr3t" not in r.text
    assert "s3cr3t" in caplog.text


def test_a_streamed_500_says_nothing_of_the_exception(faulty: ServerThread) -> None:
    body = {"model": "faulty", "prompt": "hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", faulty.base_url + "/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: {")]
    errors = [e["error"] for e in events if "error" in e]
    assert errors and errors[0]["message"] == app_mod.INTERNAL_ERROR_MESSAGE
    assert all("s3cr3t" not in json.dumps(e) for e in events)


def test_client_errors_keep_their_message(faulty: ServerThread) -> None:
    # 4xx messages say what to change: they are not affected.
    r = httpx.post(faulty.base_url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
