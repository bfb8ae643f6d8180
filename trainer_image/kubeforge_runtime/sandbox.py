"""Run untrusted, model-generated Python in a limited child process (for pass@1 scoring).

Called by :mod:`kubeforge_runtime.evaluate` (metric ``passAtOne``), which runs each
generated program followed by its record's tests through :func:`run_python`.

What one run does:

* A fresh ``sys.executable -I -S`` child: isolated mode (no ``PYTHON*`` variables, no user
  site, no script directory on ``sys.path``) and no ``site`` (no site-packages, so no
  ``.pth`` file runs and no third-party package is importable: the code gets the standard
  library only). Its environment is empty but for ``HOME``/``TMPDIR`` = the scratch directory.
* Its working directory is a fresh scratch directory, deleted afterwards.
* The code and tests go to the child on stdin (as JSON), never into source text we run.
* A small fixed bootstrap (:data:`_BOOTSTRAP`) sets resource limits on itself (address
  space = ``memory_mb``, CPU seconds ~ the timeout, 16 MiB files, 64 open files, no core
  dumps), installs an audit hook (below), then runs the code and the tests in one
  namespace. Setting the limits in the child rather than in a ``preexec_fn`` keeps
  ``subprocess`` on its fast, thread-safe vfork/exec path (the caller may hold a GPU
  context and threads).
* The parent enforces a wall-clock timeout and then kills the child's whole process group
  (``start_new_session=True``). stdout/stderr go to files capped by the file-size limit, so a
  printing loop cannot fill the parent's memory.
* Success needs exit status 0 *and* a per-run random token that the bootstrap writes only
  after the tests ran to their end, so ``sys.exit(0)`` or ``os._exit(0)`` in the generated
  code does not count as passing. ``SystemExit(0)`` raised by the tests themselves (e.g.
  ``unittest.main()``) does.

The audit hook (PEP 578) refuses: sockets (``socket.*``: creation, connect, bind,
getaddrinfo, ...), new processes and signals (``subprocess``, ``os.system``, ``os.exec*``,
``os.spawn*``, ``os.posix_spawn``, ``os.fork``, ``os.kill``, ``pty``), ``ctypes``, changing
resource limits, ``gc`` walks (a way to find and tamper with the hook's state); any open
for writing and any remove/rename/mkdir/rmdir/chmod/chown/link/symlink/truncate/utime/
chdir/shutil operation on a path that does not resolve inside the scratch directory; and
opening or listing for reading anything outside the scratch directory and the
interpreter's standard library (imports keep working; data files elsewhere are not readable).

What it does not protect against: audit hooks are a speed bump, not a security boundary.
Code in the same interpreter can defeat them (e.g. ``os.open`` with ``dir_fd``, whose
directory the hook cannot see, or a C-level bug), and limits do not stop a program from
wasting its CPU or memory budget. The real boundaries are the child process's rlimits
and, in a pod, the container's own isolation (non-root, read-only root filesystem, no
service-account token, network policy). Run untrusted code only where a compromised
process can do no more harm than the pod it runs in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILE_SIZE_LIMIT = 16 * 1024 * 1024
OPEN_FILES_LIMIT = 64
_TAIL_BYTES = 4096

# The child's bootstrap: constant source, run with -c. The job (limits, code, tests,
# token) arrives as JSON on stdin. Everything lives inside _main so that neither the
# hook nor the token is reachable from the __main__ module the untrusted code runs in.
_BOOTSTRAP = r'''
def _main():
    import json, os, resource, sys
    job = json.loads(sys.stdin.read())
    as_bytes = job["memory_mb"] * 1024 * 1024
    for limit, value in ((resource.RLIMIT_AS, as_bytes), (resource.RLIMIT_FSIZE, job["fsize"]),
                         (resource.RLIMIT_NOFILE, job["nofile"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (job["cpu_s"], job["cpu_s"] + 1))
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    scratch = realpath(os.getcwd())
    readable = (scratch,) + tuple(realpath(p) for p in sys.path if p) + ("/dev/null", "/dev/urandom")
    denied = ("socket.", "subprocess.", "_posixsubprocess.", "os.system", "os.exec", "os.spawn",
              "os.posix_spawn", "os.fork", "os.kill", "pty.", "ctypes.", "resource.", "gc.get_",
              "signal.pthread_kill", "syslog.")
    mutating = frozenset(("os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown",
                          "os.link", "os.symlink", "os.truncate", "os.utime", "os.setxattr",
                          "os.removexattr", "os.chflags", "os.chdir", "os.mkfifo", "os.mknod",
                          "sqlite3.connect"))
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def inside(path, roots):
        if isinstance(path, int):
            return True  # an already open descriptor: it was checked when it was opened
        try:
            p = realpath(fsdecode(path))
        except (TypeError, ValueError):
            return False
        return any(p == r or p.startswith(r + sep) for r in roots)

    def hook(event, args):
        if event.startswith(denied):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = bool((flags or 0) & write_flags) or any(c in (mode or "") for c in "wax+")
            if path is not None and not inside(path, (scratch,) if writing else readable):
                raise PermissionError(f"sandbox: {'writing' if writing else 'reading'} {path!r} is not allowed")
        elif event in ("os.listdir", "os.scandir"):
            if args and args[0] is not None and not inside(args[0], readable):
                raise PermissionError(f"sandbox: listing {args[0]!r} is not allowed")
        elif event in mutating or event.startswith("shutil."):
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)) and not inside(a, (scratch,)):
                    raise PermissionError(f"sandbox: {event} on {a!r} is not allowed")

    sys.addaudithook(hook)
    token, code, tests = job["token"], job["code"], job["tests"]
    del job, hook
    module = type(sys)("__main__")
    sys.modules["__main__"] = module
    namespace = module.__dict__
    namespace["__builtins__"] = __builtins__
    try:
        exec(compile(code, "<program>", "exec"), namespace)
    except SystemExit:
        if tests is not None:
            sys.stderr.write("SystemExit: the program exited before its tests ran\n")
            os._exit(1)
        raise
    if tests is not None:
        try:
            exec(compile(tests, "<tests>", "exec"), namespace)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                raise
    sys.stdout.flush()
    os.write(1, b"\n" + token.encode())
    os._exit(0)

_main()
'''


@dataclass
class SandboxResult:
    passed: bool
    reason: str
    """"ok", "timeout after Ns", "killed by SIGXCPU", or the error's last stderr line."""


def run_python(code: str, timeout_s: float, memory_mb: int, *, tests: str | None = None) -> SandboxResult:
    """Run ``code`` (then ``tests``, in the same namespace) in a limited child process;
    passed iff it ran to its end and exited 0 within the limits (see the module docstring)."""
    token = secrets.token_hex(16)
    job = {"code": code, "tests": tests, "token": token, "memory_mb": int(memory_mb),
           "cpu_s": max(1, math.ceil(timeout_s)), "fsize": FILE_SIZE_LIMIT, "nofile": OPEN_FILES_LIMIT}
    root = Path(tempfile.mkdtemp(prefix="kubeforge-sandbox-"))
    scratch = root / "scratch"
    scratch.mkdir()
    try:
        with open(root / "stdout", "w+b") as out, open(root / "stderr", "w+b") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP],
                stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=scratch,
                env={"HOME": str(scratch), "TMPDIR": str(scratch), "LC_ALL": "C.UTF-8"},
                start_new_session=True, close_fds=True,
            )
            try:
                proc.communicate(json.dumps(job).encode(), timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also whatever it may have left behind
                proc.wait()
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # type: ignore[union-attr]
            if timed_out:
                return SandboxResult(False, f"timeout after {timeout_s:g}s")
            if proc.returncode < 0:
                return SandboxResult(False, f"killed by {signal.Signals(-proc.returncode).name}")
            if proc.returncode == 0 and _tail(out).endswith(token):
                return SandboxResult(True, "ok")
            last = _tail(err).strip().splitlines()
            why = last[-1] if last else f"exit {proc.returncode}"
            if proc.returncode == 0:
                why = "exited 0 before the end of the tests"
            return SandboxResult(False, why[:200])
    finally:
        _rmtree(root)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(fh) -> str:
    fh.seek(0, os.SEEK_END)
    fh.seek(max(0, fh.tell() - _TAIL_BYTES))
    return fh.read().decode("utf-8", "replace")


def _rmtree(root: Path) -> None:
    # The child may have taken permissions away inside its scratch dir (chmod is allowed
    # there): give them back, never following its symlinks, so that the tree can go.
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                with contextlib.suppress(OSError):
                    os.chmod(p, 0o700)
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        log.warning("could not remove sandbox directory %s", root)
