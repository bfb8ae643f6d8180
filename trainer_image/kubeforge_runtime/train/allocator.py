"""Keep glibc's malloc from holding on to freed weight buffers (CPU training).

Called once by ``__main__`` (every trainer rank, :func:`configure`) before any model is built.

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

A run of one process gathers nothing: what it allocates and frees are its activations and
their gradients, the same sizes every micro-batch. There the 1 MiB mapping faults every such
block in afresh each micro-batch (measured on the benchmark's 26 M model, one process,
micro-batch 4 x 256: about 611,000 minor page faults per optimizer step, against 35,000 with
glibc's default and 1,300 with this), so :func:`keep_freed_memory` does the opposite (no
mmap, no trim): blocks come from the heap and go back to it, and a step reuses the previous
step's pages. The resident set is then the step's peak (the same 1674 MiB as glibc's default
there). :func:`configure` picks one of the two for the run (``__main__``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Callable

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
KEEP_TRIM_THRESHOLD = (1 << 31) - 1
"""Free memory at the heap's top is given back only above this many bytes (about never)."""
MMAP_THRESHOLD = 1 << 20
"""Blocks of at least this many bytes get their own mapping, returned on free."""


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where there is none."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


def limit_malloc_caching(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds at ``threshold``; False where there is no glibc ``mallopt``."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
    if not ok:
        log.warning("mallopt refused the mmap/trim thresholds: freed weight buffers may stay resident")
    return ok


def keep_freed_memory() -> bool:
    """Serve every block from glibc's heaps and keep what is freed there for reuse (no mmap,
    no trim); False where there is no glibc ``mallopt``."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))
    if not ok:
        log.warning("mallopt refused M_MMAP_MAX/M_TRIM_THRESHOLD: activations are faulted in afresh every step")
    return ok


def configure(world_size: int) -> str:
    """Apply the allocator setting for one trainer process of a run of ``world_size``
    processes and name it: "limit" (several: FSDP/ZeRO-3 gather and free weights, see
    above) or "keep" (one process). Called before any model is built."""
    if world_size > 1:
        limit_malloc_caching()
        return "limit"
    keep_freed_memory()
    return "keep"
