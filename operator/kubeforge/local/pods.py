"""Turn a rendered pod spec into a local process: the one place that "plays the kubelet".

Only what a laptop cannot have is changed, and each change is explicit:

* ``python`` and ``torchrun`` resolve to this interpreter's (same venv);
* the config map mounted at ``/etc/kubeforge`` becomes a local directory holding the same
  files, and every argument that points into a mounted path is rewritten to the local one;
* ``pvc://`` claims live under a local directory (``KUBEFORGE_PVC_ROOT``), emptyDirs are
  fresh local directories;
* host names in ``host_map`` (the rendezvous endpoint ``<job>-0.<job>``) become 127.0.0.1,
  and the ports the pod would own alone get free local ports where several pods share the
  machine;
* ``valueFrom.fieldRef`` on the completion-index annotation becomes the pod's index.

Everything else — the command, the arguments, the environment — is exactly what the
cluster's pod would run, which is what the end-to-end tests rely on.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMPLETION_INDEX_PATHS = (
    "metadata.annotations['batch.kubernetes.io/job-completion-index']",
    "metadata.labels['batch.kubernetes.io/job-completion-index']",
)


@dataclass
class LocalProcessSpec:
    argv: list[str]
    env: dict[str, str]
    cwd: Path


def _executable(name: str) -> str:
    if name in ("python", "python3"):
        return sys.executable
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _map_text(value: str, path_map: dict[str, str], host_map: dict[str, str]) -> str:
    for remote, local in sorted(path_map.items(), key=lambda kv: -len(kv[0])):
        if value == remote or value.startswith(remote + "/") or ("=" + remote) in value:
            value = value.replace(remote, local, 1)
    for host, local in host_map.items():
        if host in value:
            value = value.replace(host, local)
    return value


def localize_container(
    pod_spec: dict[str, Any],
    *,
    volume_dirs: dict[str, Path],
    host_map: dict[str, str] | None = None,
    completion_index: int | None = None,
    extra_env: dict[str, str] | None = None,
    container_index: int = 0,
) -> LocalProcessSpec:
    """The argv/env/cwd that run ``pod_spec``'s container here.

    ``volume_dirs`` maps each volume *name* of the pod to a local directory (config maps
    already written out). A volume without an entry is an error: nothing is silently dropped.
    """
    host_map = host_map or {}
    container = pod_spec["containers"][container_index]
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    path_map: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        if mount["name"] not in volume_dirs:
            raise ValueError(f"volume {mount['name']!r} (mounted at {mount['mountPath']}) has no local directory")
        if mount["name"] not in volumes:
            raise ValueError(f"volumeMount {mount['name']!r} names no volume of the pod")
        path_map[mount["mountPath"]] = str(volume_dirs[mount["name"]])

    env: dict[str, str] = {k: v for k, v in os.environ.items()}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _map_text(str(var["value"]), path_map, host_map)
        elif "valueFrom" in var:
            field = var["valueFrom"].get("fieldRef", {}).get("fieldPath")
            if field in COMPLETION_INDEX_PATHS and completion_index is not None:
                env[var["name"]] = str(completion_index)
            elif field == "metadata.name":
                env[var["name"]] = f"local-{completion_index or 0}"
            elif field == "metadata.namespace":
                env[var["name"]] = "local"
            elif field == "status.podIP":
                env[var["name"]] = "127.0.0.1"
            elif "secretKeyRef" in var["valueFrom"]:
                # Secrets never live in a spec; locally they come from the caller's environment.
                if var["name"] not in env:
                    continue
            else:
                raise ValueError(f"env {var['name']}: cannot run valueFrom {var['valueFrom']} locally")
    if completion_index is not None:
        env["JOB_COMPLETION_INDEX"] = str(completion_index)
    env.update(extra_env or {})

    command = list(container.get("command", [])) + list(container.get("args", []))
    if not command:
        raise ValueError("the container has no command: the local runner needs an explicit entry point")
    argv = [_executable(command[0])] + [_map_text(a, path_map, host_map) for a in command[1:]]
    # Inside the argv, later "python"/"torchrun" words (after the launch wrapper's "--") too.
    argv = [_executable(a) if a in ("python", "python3", "torchrun") else a for a in argv]
    workdir = Path(path_map.get(container.get("workingDir", ""), "")) if container.get("workingDir") else None
    cwd = workdir or next(iter(volume_dirs.values()))
    return LocalProcessSpec(argv=argv, env=env, cwd=Path(cwd))
