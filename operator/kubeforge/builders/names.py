"""Deterministic child names for the builders (pure).

Children are found again by name after an operator restart, so names are a function of the
parent's name only; a stable hash shortens names that would exceed a length limit without
letting two long names that share a prefix collide.
"""

from __future__ import annotations

import hashlib

LABEL_VALUE_MAX = 63
"""Names that become label values (a Job's name) or DNS labels (a Service's) fit in 63."""


def child_name(name: str, suffix: str, max_len: int = LABEL_VALUE_MAX) -> str:
    """``<name>-<suffix>``, shortened with a stable hash when it would exceed ``max_len``."""
    full = f"{name}-{suffix}" if suffix else name
    if len(full) <= max_len:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    tail = f"-{digest}-{suffix}" if suffix else f"-{digest}"
    return f"{name[:max_len - len(tail)].rstrip('-')}{tail}"
