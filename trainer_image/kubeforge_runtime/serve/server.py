"""Process wiring: HTTP (uvicorn) and gRPC on one event loop, the model loading beside them.

Startup order, which is what the operator's probes rely on:

1. the HTTP and gRPC ports open at once - ``GET /health`` answers 200 while loading, so the
   startupProbe/livenessProbe see a live process, and ``GET /ready`` answers 503;
2. a background thread loads the base model and each adapter, builds their engines and runs
   one warm-up generation each;
3. ``/ready`` turns 200. If loading fails, the error is logged, written to the termination
   log, ``/health`` and ``/ready`` answer 503 (a generic message: the reason stays in the
   log and the termination message), and the process exits with
   code 1 a few seconds later (so the message is scrapeable and the pod restarts with back-off).

``serve_forever`` is what ``python -m kubeforge_runtime.serve`` runs; ``ServerThread`` runs
the same server in a thread of the current process (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from .. import contract
from .app import create_app
from .config import ServeConfig
from .service import ServingRuntime

log = logging.getLogger(__name__)

LOAD_FAILED_EXIT_DELAY_S = 5.0


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _write_termination_log(message: str) -> None:
    path = contract.termination_log_path()
    if path is not None:
        with contextlib.suppress(OSError):
            path.write_text(message[:4000])


class Server:
    """One serving process: runtime, HTTP app, gRPC server."""

    def __init__(self, config: ServeConfig, host: str = "0.0.0.0", api_key: str | None = None, load: bool = True) -> None:
        self.config = config
        self.host = host
        self.api_key = api_key if api_key is not None else (os.environ.get(contract.ENV_API_KEY) or None)
        self.runtime = ServingRuntime(config)
        self.socket = _bind(host, config.port)
        self.port: int = self.socket.getsockname()[1]
        self.grpc_port: int | None = None
        self.exit_code = 0
        self._load = load
        self._grpc: Any = None
        self._uvicorn: uvicorn.Server | None = None
        self.app = create_app(self.runtime, self.api_key, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Any) -> AsyncIterator[None]:
        if self.config.grpc_port is not None:
            from .grpc_server import start_grpc

            self._grpc, self.grpc_port = await start_grpc(self.runtime, self.host, self.config.grpc_port, self.api_key)
        if self._load:
            threading.Thread(target=self._load_models, name="kubeforge-model-loader", daemon=True).start()
        try:
            yield
        finally:
            if self._grpc is not None:
                await self._grpc.stop(grace=2)
            await asyncio.get_running_loop().run_in_executor(None, self.runtime.stop)

    def _load_models(self) -> None:
        try:
            self.runtime.load()
        except Exception as exc:  # any failure to load is fatal for this pod
            message = f"{type(exc).__name__}: {exc}"
            log.exception("model load failed")
            self.runtime.load_error = message
            _write_termination_log(f"ModelLoadFailed: {message}")
            self.exit_code = 1
            time.sleep(LOAD_FAILED_EXIT_DELAY_S)
            if self._uvicorn is not None:
                self._uvicorn.should_exit = True

    def uvicorn_config(self) -> uvicorn.Config:
        return uvicorn.Config(
            self.app,
            log_level="warning",
            loop="asyncio",
            access_log=False,
            timeout_graceful_shutdown=10,
            # Closing idle keep-alive sockets quickly is not what we want behind a Service.
            timeout_keep_alive=30,
        )

    def run(self) -> int:
        """Serve until SIGTERM (uvicorn handles it: stop accepting, drain, exit)."""
        self._uvicorn = uvicorn.Server(self.uvicorn_config())
        log.info("HTTP listening on %s:%d", self.host, self.port)
        # uvicorn drains on SIGTERM, restores the previous handlers and re-raises the signal;
        # with the default handler that would turn a clean drain into "killed by SIGTERM".
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: log.info("shut down on signal %d", signum))
        self._uvicorn.run(sockets=[self.socket])
        return self.exit_code


class ServerThread:
    """Run a :class:`Server` in a daemon thread; for tests and benchmarks."""

    def __init__(self, config: ServeConfig, api_key: str | None = None, host: str = "127.0.0.1") -> None:
        self.server = Server(config, host=host, api_key=api_key)
        self._uv = uvicorn.Server(self.server.uvicorn_config())
        self.server._uvicorn = self._uv
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [self.server.socket]}, daemon=True)

    @property
    def runtime(self) -> ServingRuntime:
        return self.server.runtime

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def start(self, wait_ready: float = 300.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + wait_ready
        while time.monotonic() < deadline:
            if self.runtime.load_error:
                raise RuntimeError(f"server failed to load: {self.runtime.load_error}")
            if self.runtime.ready.is_set() and self._uv.started:
                return self
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {wait_ready} s")

    def request_stop(self) -> None:
        self._uv.should_exit = True

    def stop(self) -> None:
        self.request_stop()
        self._thread.join(timeout=30)
