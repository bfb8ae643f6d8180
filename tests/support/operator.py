"""``python -m kubeforge <args>`` as a real local process: the operator under test.

One class for every suite that runs the operator (the fixtures in tests/conftest.py, the
FineTuneJob suite, the chart's ServiceAccount and HA tests): it starts the process with a
given kubeconfig, logs to a file, and stops it by its own PID — gently, or with SIGKILL to
play a crashed pod.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.cluster import REPO


class KubeforgeProcess:
    """``python -m kubeforge *args`` authenticated by ``kubeconfig_path``."""

    def __init__(self, args: list[str], kubeconfig_path: Path, log_path: Path, env: dict[str, str] | None = None):
        self.args, self.kubeconfig_path, self.log_path = list(args), kubeconfig_path, log_path
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "KubeforgeProcess":
        env = dict(os.environ)
        env.update({"KUBECONFIG": str(self.kubeconfig_path), "PYTHONUNBUFFERED": "1", **self.env})
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image")])
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "kubeforge", *self.args], stdout=fh,
                                         stderr=subprocess.STDOUT, env=env, cwd=REPO)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the operator dies mid-whatever, as a crashed pod would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
