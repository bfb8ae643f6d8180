"""``kubeforge run`` leaves nothing running when it is stopped, and serves on the loopback
address it prints. Real processes: the CLI in a subprocess, a real model server on the tiny
model, real signals; what runs is read from /proc."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from kubeforge.local.pods import LocalProcessSpec
from kubeforge.local.runner import LocalRunner

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubeforge_runtime.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", preset="tiny", seed=0)


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (any session, any process group), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) of sockets listening on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                out.add(address)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_stops_its_model_server_which_bound_the_loopback_only(
        sig: signal.Signals, tmp_path: Path, tiny_model: Path) -> None:
    manifest = tmp_path / "serve.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "tiny"},
        "spec": {"model": {"uri": "pvc://models/tiny"}, "engine": {"batching": "dynamic"}},
    }))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image")])}
    # The CLI starts with SIGINT handled, as under a terminal's Ctrl-C: pytest started as a
    # background command of a non-interactive shell (`nohup pytest ... &`) has SIGINT ignored,
    # which the CLI would inherit and then never stop (the [2] case failed so in such a run).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cli = subprocess.Popen(
            [sys.executable, "-m", "kubeforge", "run", "-f", str(manifest), "--workdir", str(tmp_path / "runs"),
             "--model", str(tiny_model), "--serve"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    children: set[int] = set()
    try:
        assert cli.stderr is not None
        printed, port = "", None
        deadline = time.monotonic() + 240
        while port is None and time.monotonic() < deadline:
            line = cli.stderr.readline()
            assert line or cli.poll() is None, f"kubeforge run exited {cli.poll()}:\n{printed}"
            printed += line
            found = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)/v1", line)
            port = int(found.group(1)) if found else None
        assert port is not None, printed
        deadline = time.monotonic() + 120
        while not _listening_addresses(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        bound = _listening_addresses(port)
        children = _descendants(cli.pid)
        assert children, "no model server process found under kubeforge run"

        cli.send_signal(sig)
        assert cli.wait(timeout=90) == 128 + sig
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in children if _alive(p)], "processes outlived kubeforge run"
        assert not _listening_addresses(port)
        # Bound to 127.0.0.1 (0100007F in /proc/net/tcp), the address printed; never 0.0.0.0.
        assert bound == {"0100007F"}
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        for pid in children:  # never leak a server from a failing test
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_stop_children_kills_a_whole_group_that_ignores_sigterm(tmp_path: Path) -> None:
    """A pod (and what it started) that ignores SIGTERM is SIGKILLed after the grace period."""
    runner = LocalRunner(tmp_path, console=Console(file=open(os.devnull, "w")), progress=False)
    script = "trap '' TERM; sleep 300 & sleep 300 & wait"
    proc = runner._spawn(LocalProcessSpec(["sh", "-c", script], dict(os.environ), tmp_path), tmp_path / "pod.log")
    deadline = time.monotonic() + 10
    while len(_descendants(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    group = {proc.pid} | _descendants(proc.pid)
    assert len(group) == 3
    started = time.monotonic()
    runner.stop_children(grace=1.0)
    assert time.monotonic() - started < 10
    time.sleep(0.2)
    assert not [p for p in group if _alive(p)]
