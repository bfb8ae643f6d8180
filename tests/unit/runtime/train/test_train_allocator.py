"""allocator.py: with glibc's mmap threshold fixed, weight buffers gathered and freed layer
by layer (FSDP2's pattern on CPU) do not stay resident; without it they do (the cause)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PATTERN = r"""
import sys, torch
from kubeforge_runtime.train.allocator import limit_malloc_caching
if sys.argv[1] == "limited":
    assert limit_malloc_caching()
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) * 1024
before = anon()
keep = []
sizes = [2048 * 5632] * 3 + [2048 * 2048] * 2 + [512 * 2048] * 2   # one decoder layer's weights (1 B model)
for layer in range(20):
    gathered = [torch.empty(n, dtype=torch.bfloat16).fill_(1) for n in sizes]
    keep.append(torch.ones(64 * 2048 * 6))   # what the layer saves for backward: kept
    keep.append(torch.ones(1000))
    del gathered
kept = sum(t.numel() * t.element_size() for t in keep)
print(anon() - before - kept)
"""


def _retained(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_layer_weights_do_not_stay_resident() -> None:
    limited, default = _retained("limited"), _retained("default")
    assert limited < 32 * 2**20, f"{limited / 2**20:.0f} MiB of freed weights stayed resident"
    # The cause this module addresses: glibc's default keeps tens of MB per layer.
    assert default > limited + 64 * 2**20, (default, limited)
