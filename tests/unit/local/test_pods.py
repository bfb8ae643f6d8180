"""localize_container: a rendered pod becomes a local process with only the host mapped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kubeforge.local.pods import localize_container


def pod(**container_overrides):
    container = {
        "name": "trainer",
        "command": ["python", "-m", "kubeforge_runtime.launch", "--config", "/etc/kubeforge/config.json", "--",
                    "torchrun", "--rdzv-endpoint=job-0.job:29400", "-m", "kubeforge_runtime.train",
                    "--config", "/etc/kubeforge/config.json"],
        "env": [
            {"name": "PET_RDZV_ENDPOINT", "value": "job-0.job:29400"},
            {"name": "MASTER_ADDR", "value": "job-0.job"},
            {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        ],
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/kubeforge"}, {"name": "ws", "mountPath": "/workspace"}],
    }
    container.update(container_overrides)
    return {"containers": [container],
            "volumes": [{"name": "cfg", "configMap": {"name": "job-config"}}, {"name": "ws", "emptyDir": {}}]}


def test_only_paths_hosts_and_index_change(tmp_path: Path):
    dirs = {"cfg": tmp_path / "cfg", "ws": tmp_path / "ws"}
    spec = localize_container(pod(), volume_dirs=dirs, completion_index=1,
                              host_map={"job-0.job:29400": "127.0.0.1:5555", "job-0.job": "127.0.0.1"})
    assert spec.argv[0] == sys.executable
    assert spec.argv[1:5] == ["-m", "kubeforge_runtime.launch", "--config", f"{tmp_path}/cfg/config.json"]
    assert "--rdzv-endpoint=127.0.0.1:5555" in spec.argv
    assert spec.argv[-1] == f"{tmp_path}/cfg/config.json"
    torchrun = spec.argv[spec.argv.index("--") + 1]
    assert Path(torchrun).name == "torchrun"
    assert spec.env["PET_RDZV_ENDPOINT"] == "127.0.0.1:5555"
    assert spec.env["MASTER_ADDR"] == "127.0.0.1"
    assert spec.env["PET_NODE_RANK"] == "1"


def test_unmapped_volume_is_an_error(tmp_path: Path):
    with pytest.raises(ValueError, match="has no local directory"):
        localize_container(pod(), volume_dirs={"cfg": tmp_path})


def test_unknown_value_from_is_an_error(tmp_path: Path):
    p = pod(env=[{"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}])
    with pytest.raises(ValueError, match="cannot run valueFrom"):
        localize_container(p, volume_dirs={"cfg": tmp_path, "ws": tmp_path})
