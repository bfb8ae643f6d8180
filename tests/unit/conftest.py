"""Unit tests never open watches: the webhook's watch cache (kubeforge.controllers.cache) is
kept from starting its informer threads, so its reads take their not-yet-synced path through
``kubeforge.kube`` (which the tests replace). Without this, every webhook unit test left
threads behind that listed against whatever kubeconfig the machine has (a developer's real
cluster, or none: an "Invalid kube-config" line every 2 s after the session)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_informer_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Only where a test module imported the operator (at collection): importing it here would
    # register kopf's handlers in every unit test process.
    cache = sys.modules.get("kubeforge.controllers.cache")
    if cache is None:
        yield
        return
    monkeypatch.setattr(cache.Informer, "start", lambda self: self)
    yield
    cache.stop_all()
