"""kopf's session with a bounded connection pool (controllers/session.py)."""

from __future__ import annotations

import asyncio
import logging

import kopf

import kubeforge.controllers  # noqa: F401  (registers the handlers)
from kubeforge.controllers import session


def test_every_watched_resource_is_counted():
    # FineTuneJob, QuantizeJob, InferenceService, and the children watched by event handlers.
    assert session.watched_resources(kopf.get_default_registry()) >= 5


def test_the_limit_leaves_request_connections_beside_every_stream():
    one = session.connection_limit(7, ["ml"])
    assert one == 7 + session.EXTRA_STREAMS + session.REQUEST_CONNECTIONS
    assert session.connection_limit(7, None) == one  # cluster-wide: one stream per resource
    three = session.connection_limit(7, ["a", "b", "c"])
    assert three - session.REQUEST_CONNECTIONS == 3 * (one - session.REQUEST_CONNECTIONS)


def test_login_bounds_the_pool_only_when_configured(monkeypatch):
    info = kopf.ConnectionInfo(server="https://127.0.0.1:1", insecure=True, token="t", scheme="Bearer",
                               default_namespace="ml", priority=3)
    monkeypatch.setattr(kopf, "login_via_client", lambda **_: info)
    log = logging.getLogger("test")

    limits: list[int] = []

    async def login() -> object:
        out = await session.login(logger=log, settings=kopf.OperatorSettings())
        if isinstance(out, kopf.AiohttpSession):
            limits.append(out.aiohttp_session.connector.limit)
            assert out.aiohttp_session.headers["Authorization"] == "Bearer t"
            await out.aiohttp_session.close()
        return out

    monkeypatch.setattr(session, "_namespaces", None)
    assert asyncio.run(login()) is info  # kopf run some other way: kopf's own session
    session.configure(["ml"])
    try:
        out = asyncio.run(login())
    finally:
        monkeypatch.setattr(session, "_namespaces", None)
    assert isinstance(out, kopf.AiohttpSession)
    assert (out.server, out.default_namespace, out.priority) == (info.server, "ml", 3)
    expected = session.connection_limit(session.watched_resources(kopf.get_default_registry()), ["ml"])
    assert limits == [expected] and expected > session.REQUEST_CONNECTIONS


def test_an_unknown_registry_layout_keeps_kopfs_unbounded_session(monkeypatch):
    info = kopf.ConnectionInfo(server="https://127.0.0.1:1", insecure=True, token="t", scheme="Bearer")
    monkeypatch.setattr(kopf, "login_via_client", lambda **_: info)
    monkeypatch.setattr(kopf, "get_default_registry", lambda: object())  # no _watching etc.
    assert session.watched_resources(object()) is None
    session.configure(["ml"])
    try:
        out = asyncio.run(session.login(logger=logging.getLogger("test"), settings=kopf.OperatorSettings()))
    finally:
        monkeypatch.setattr(session, "_namespaces", None)
    assert out is info
