"""Hub downloads: transient failures are retried then fail as runtime errors (exit 1, the Job
retries the pod); a name that does not exist is a configuration error (exit 78) at once; only
weights, configs and tokenizer files are fetched.

The failing hub is a real local HTTP server (``snapshot_download`` talks to it through
``HF_ENDPOINT``): what it answers and how often it was asked is what is checked. Only the
"fails, then succeeds" case replaces ``snapshot_download`` by a fake (a named fault
injection): a hub that then serves a whole repository would be a re-implementation of the
Hub's file protocol, not a test of ours.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubeforge_runtime import storage


class _Hub:
    """A local server answering every request with ``status`` and counting requests."""

    def __init__(self, status: int) -> None:
        self.status, self.paths = status, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                hub.paths.append(self.path)
                body = json.dumps({"error": "nope"}).encode()
                self.send_response(hub.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def repo_lookups(self) -> int:
        return sum(1 for p in self.paths if p.startswith("/api/models/"))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    import huggingface_hub.constants

    servers: list[_Hub] = []

    def start(status: int) -> _Hub:
        server = _Hub(status)
        servers.append(server)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        return server

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(storage, "DOWNLOAD_BACKOFF_S", 0.01)
    yield start
    for s in servers:
        s.server.shutdown()


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_hub_error_that_may_pass_is_retried_then_fails_as_a_runtime_error(hub: Any, status: int) -> None:
    server = hub(status)
    with pytest.raises(storage.DownloadFailed, match=f"after {storage.DOWNLOAD_ATTEMPTS} tries") as info:
        storage.resolve("hf://someone/model")
    assert not isinstance(info.value, storage.StorageError)  # not a configuration error (78)
    assert server.repo_lookups() == storage.DOWNLOAD_ATTEMPTS


def test_an_unreachable_hub_is_retried_then_fails_as_a_runtime_error(hub: Any) -> None:
    server = hub(200)
    url = server.url
    server.server.shutdown()
    server.server.server_close()  # connection refused from now on
    with pytest.raises(storage.DownloadFailed, match="ConnectError|Connect"):
        storage.resolve("hf://someone/model")
    assert url  # the endpoint stayed pointed at the closed port


@pytest.mark.parametrize("status", [404, 403, 401])
def test_a_missing_or_forbidden_repository_is_a_configuration_error_at_once(hub: Any, status: int) -> None:
    server = hub(status)
    with pytest.raises(storage.StorageError, match="hf://someone/missing"):
        storage.resolve("hf://someone/missing")
    assert server.repo_lookups() == 1


def test_a_download_that_fails_twice_then_succeeds_returns_the_model(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """Fault injection (a fake snapshot_download): the first two calls raise what
    huggingface_hub raises when the connection drops, the third returns a model directory."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    model = tmp_path / "snapshot"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    calls: list[dict[str, Any]] = []

    def flaky(**kwargs: Any) -> str:
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        if len(calls) <= 3:
            try:
                raise httpx2.ReadTimeout("timed out")
            except httpx2.ReadTimeout as exc:  # as snapshot_download wraps a failed lookup
                raise LocalEntryNotFoundError("cannot reach the hub") from exc
        return str(model)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", flaky)
    monkeypatch.setattr(storage, "DOWNLOAD_BACKOFF_S", 0.01)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    assert storage.resolve("hf://someone/model") == model
    assert len(calls) == 4  # the cache look-up, two failures, the success
    patterns = calls[-1]["allow_patterns"]
    assert "*.safetensors" in patterns and "*.json" in patterns and "tokenizer.model" in patterns
    assert not any(p in patterns for p in ("*", "*.bin", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.pth"))


def test_allow_patterns_keep_weights_configs_and_tokenizers_only() -> None:
    from fnmatch import fnmatch

    def fetched(name: str) -> bool:
        return any(fnmatch(name, p) for p in storage.HUB_ALLOW_PATTERNS)

    for name in ("config.json", "generation_config.json", "model.safetensors", "model-00001-of-00002.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "merges.txt", "vocab.json", "chat_template.jinja", "adapter_config.json",
                 "adapter_model.safetensors"):
        assert fetched(name), name
    for name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "onnx/model.onnx", "model.gguf",
                 "original/consolidated.00.pth", "README.md", ".gitattributes"):
        assert not fetched(name), name
