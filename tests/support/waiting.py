"""Polling helpers for tests that watch a real cluster converge."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float = 60.0, interval: float = 0.3, what: str = "condition") -> T:
    """Call ``check`` until it returns something truthy; return that, or raise with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - keep polling, report at the end
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def get_json(cluster: Any, *args: str) -> dict[str, Any]:
    out = cluster.kubectl("get", *args, "-o", "json", check=True)
    return json.loads(out.stdout)
