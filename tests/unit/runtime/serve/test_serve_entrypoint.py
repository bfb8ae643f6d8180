"""The pod's entry point as the operator runs it: ``python -m kubeforge_runtime.serve --config PATH``.

Also the config contract: exactly the operator's camelCase shape, unknown keys named.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support.serving import make_config
from kubeforge_runtime import contract
from kubeforge_runtime.serve.config import ConfigError, parse_config

OPERATOR_EXAMPLE = {
    "kind": "InferenceService",
    "name": "demo",
    "namespace": "default",
    "servedModelName": "demo",
    "model": {"uri": "file:///models/m"},
    "adapters": [{"name": "support-bot", "uri": "file:///adapters/a"}],
    "engine": {
        "backend": "kubeforge",
        "batching": "auto",
        "dtype": "auto",
        "maxBatchTokens": 4096,
        "maxConcurrentRequests": 16,
        "maxQueuedRequests": 64,
        "kvBlockSize": 16,
        "maxModelLength": None,
        "requestTimeoutSeconds": 120,
    },
    "port": 8000,
    "grpcPort": 8001,
}


def test_operator_example_parses() -> None:
    cfg = parse_config(OPERATOR_EXAMPLE)
    assert cfg.model_names() == ["demo", "support-bot"]
    assert cfg.engine.max_queued_requests == 64 and cfg.port == contract.SERVE_HTTP_PORT and cfg.grpc_port == contract.SERVE_GRPC_PORT


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: c["engine"].update(maxBatchToken=1), "unknown key 'engine.maxBatchToken'"),
        (lambda c: c.update(replicas=2), "unknown key 'replicas'"),
        (lambda c: c["engine"].update(backend="vllm"), "engine.backend"),
        (lambda c: c["engine"].update(kvBlockSize=2), "engine.kvBlockSize"),
        (lambda c: c.pop("model"), "model"),
        (lambda c: c["adapters"].append({"name": "support-bot", "uri": "file:///b"}), "repeated: support-bot"),
        (lambda c: c["adapters"].append({"name": "demo", "uri": "file:///b"}), "clashes"),
    ],
)
def test_bad_config_names_the_key(mutate, needle: str) -> None:
    cfg = json.loads(json.dumps(OPERATOR_EXAMPLE))
    mutate(cfg)
    with pytest.raises(ConfigError, match=needle.replace("'", ".").replace("(", ".")):
        parse_config(cfg)


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kubeforge_runtime.serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_invalid_config_exits_78(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**OPERATOR_EXAMPLE, "engin": {}}))
    proc = _run(["--config", str(path)])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == contract.EXIT_CONFIG_ERROR, out
    assert "unknown key 'engin'" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_starts_probes_serves_and_stops_on_sigterm(tmp_path: Path, tiny_model: Path) -> None:
    cfg = make_config(tiny_model, maxConcurrentRequests=2)
    cfg["port"], cfg["grpcPort"] = _free_port(), _free_port()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    proc = _run(["--config", str(path), "--host", "127.0.0.1"], env={contract.ENV_API_KEY: "k"})
    base = f"http://127.0.0.1:{cfg['port']}"
    try:
        seen_health, ready = False, False
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not ready:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                seen_health = seen_health or httpx.get(base + "/health", timeout=2).status_code == 200
                ready = httpx.get(base + "/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert seen_health and ready
        headers = {"Authorization": "Bearer k"}
        r = httpx.post(base + "/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 3}, headers=headers, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_load_failure_is_reported_and_exits_1(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "missing")
    cfg["port"], cfg["grpcPort"] = _free_port(), None
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    proc = _run(["--config", str(path), "--host", "127.0.0.1"])
    base = f"http://127.0.0.1:{cfg['port']}"
    try:
        reason = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not reason:
            try:
                r = httpx.get(base + "/ready", timeout=2)
                if "failed" in r.text:
                    reason = r.json()["error"]["message"]
                    assert httpx.get(base + "/health", timeout=2).status_code == 503
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        # The probes answer without a key: the reason goes to the log, not to them.
        assert "failed to load" in reason and "does not exist" not in reason and str(tmp_path) not in reason
        assert proc.wait(timeout=60) == 1
        assert "does not exist" in (proc.stdout.read() if proc.stdout else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_auto_backend_falls_back_to_dynamic_where_continuous_cannot_run() -> None:
    from types import SimpleNamespace

    from kubeforge_runtime.serve.engine import select_backend

    def fake(attn: str, has_cb: bool = True) -> object:
        model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=attn, is_encoder_decoder=False))
        if has_cb:
            model.init_continuous_batching = lambda **_: None  # type: ignore[attr-defined]
        return model

    assert select_backend("auto", fake("sdpa")) == ("continuous", "auto: supported")
    name, why = select_backend("auto", fake("flex_attention"))
    assert name == "dynamic" and "flex_attention" in why
    assert select_backend("auto", fake("sdpa", has_cb=False))[0] == "dynamic"
    assert select_backend("dynamic", fake("sdpa"))[0] == "dynamic"
    with pytest.raises(RuntimeError, match="batching is 'continuous'"):
        select_backend("continuous", fake("flex_attention"))
