"""kopf's HTTP session with a bounded connection pool, so a burst reuses connections.

kopf's own session (``aiohttp.TCPConnector(limit=0)``) opens a new connection for every request
sent while all open ones are busy. Its watch streams each hold one for good; the rest of its
requests (its annotation patches, Event posts) come in bursts: 200 FineTuneJobs created at once
meant up to 200 concurrent patches, each on a new TLS connection, the handshake paid by kopf's
event loop and by the API server alike (8 % of the event loop's busy time, py-spy).

:func:`login` is kopf's login (``kopf.login_via_client``: in-cluster service account, else the
kubeconfig) with the same session, headers and TLS context, but a pool of at most
:func:`connection_limit` connections: one per watch stream the operator can open, plus
:data:`REQUEST_CONNECTIONS` for everything else. A burst then waits a moment for a free, already
established connection instead of opening more (aiohttp keeps released connections alive).

The limit needs the watched namespaces (each is a stream per resource): :func:`configure`, called
by :func:`.runner.run_operator`. Unconfigured (kopf run some other way), the pool is unbounded, as
kopf's own.
"""

from __future__ import annotations

from typing import Any, Iterable

import aiohttp
import kopf

REQUEST_CONNECTIONS = 16
"""Connections for kopf's requests other than watch streams (patches, Event posts, lists)."""
EXTRA_STREAMS = 4
"""Streams beside the handlers' resources: peering, and kopf's observers of CRDs and namespaces."""

_namespaces: tuple[str, ...] | None = None


def configure(namespaces: Iterable[str] | None) -> None:
    """The namespaces the operator watches (empty or None: the whole cluster)."""
    global _namespaces
    _namespaces = tuple(namespaces or ())


def connection_limit(resources: int, namespaces: Iterable[str] | None) -> int:
    """At most this many connections: a watch stream per resource and namespace (and
    :data:`EXTRA_STREAMS` per namespace), plus :data:`REQUEST_CONNECTIONS`. A pool smaller than
    the streams would leave a request waiting for ever, so the streams are counted generously."""
    scopes = max(1, len(tuple(namespaces or ())))
    return (resources + EXTRA_STREAMS) * scopes + REQUEST_CONNECTIONS


def watched_resources(registry: Any) -> int | None:
    """How many resource selectors kopf's ``registry`` has handlers for (each is watched), or
    None when this kopf's registry is not laid out as expected (its private parts): then the
    streams cannot be counted, and a pool too small for them would stall requests for ever."""
    selectors: set[Any] = set()
    for part in ("_watching", "_changing", "_indexing", "_spawning"):
        handlers = getattr(registry, part, None)
        if handlers is None or not hasattr(handlers, "get_all_selectors"):
            return None
        selectors |= set(handlers.get_all_selectors())
    return len(selectors)


@kopf.on.login()
async def login(logger: Any, settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | kopf.AiohttpSession | None:
    info = kopf.login_via_client(logger=logger, settings=settings, **kwargs)
    resources = None if _namespaces is None else watched_resources(kopf.get_default_registry())
    if info is None or resources is None:
        return info  # unconfigured, or the streams cannot be counted: kopf's own (unbounded) session
    limit = connection_limit(resources, _namespaces)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        auth=info.as_aiohttp_basic_auth(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    logger.debug("kopf's session: at most %d connections", limit)
    return kopf.AiohttpSession(aiohttp_session=session, server=info.server, priority=info.priority,
                               default_namespace=info.default_namespace, expiration=info.expiration)
