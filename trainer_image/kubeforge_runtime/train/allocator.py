"""Keep glibc's malloc from holding on to freed weight buffers (CPU training).

Called once by ``__main__`` (every trainer rank) before any model is built.

Why: FSDP2 gathers a layer's weights before its forward and frees them after it, layer by
layer; on CPU every gathered weight is an ordinary ``malloc`` of a few to a few tens of MB.
glibc serves a block that large with ``mmap`` (given back to the kernel on ``free``) until the
first such block is freed - then it raises its mmap threshold to that block's size (up to
32 MB) and serves later blocks of that size from its heaps, where freed memory stays in the
process unless it happens to lie at a heap's top. Measured on the 1 B bench model
(``benchmarks/bench_load.py``, FSDP DP=4, 2026-12-01): the resident set of every rank grew by
about 1.1 GiB during the first forward and backward although no tensor outlived its layer.

:func:`limit_malloc_caching` fixes the mmap threshold at :data:`MMAP_THRESHOLD` (setting it
turns glibc's dynamic adjustment off) and the trim threshold likewise, so every block from
1 MiB up is mapped and unmapped on its own. Costs a page-fault pass per gathered weight,
which is small against the all-gather itself. GPUs are unaffected (CUDA's caching
allocator); with a non-glibc libc (musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
"""Blocks of at least this many bytes get their own mapping, returned on free."""


def limit_malloc_caching(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds at ``threshold``; False where there is no glibc ``mallopt``."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
    if not ok:
        log.warning("mallopt refused the mmap/trim thresholds: freed weight buffers may stay resident")
    return ok
