"""FineTuneJob with every URI on S3, against a real S3-protocol server (moto, in-process).

The pod's entry point as processes (``launch`` preflight, then the trainer; one process, so no
torchrun start-up on two cores): the model and dataset are downloaded from the bucket, the
checkpoint is uploaded, a fresh run in an empty staging directory resumes from the bucket, the
merged output goes up with its lineage record last and reads back, and pruning deletes the
remote checkpoint it replaced. The preflight's own S3 checks run in this process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from train_support import DATA, Run, assert_same, child_env, merge  # noqa: E402

from kubeforge_runtime import contract, storage  # noqa: E402
from support.s3server import moto_server, s3_env  # noqa: E402

BUCKET = "kf-train"


@pytest.fixture(scope="module")
def endpoint(tiny_model: Path):
    with moto_server() as url:
        client = boto3.client("s3", endpoint_url=url, **_creds())
        client.create_bucket(Bucket=BUCKET)
        for f in sorted(tiny_model.rglob("*")):
            if f.is_file():
                client.upload_file(str(f), BUCKET, f"models/tiny/{f.relative_to(tiny_model).as_posix()}")
        client.upload_file(str(DATA / "text.jsonl"), BUCKET, "data/text.jsonl")
        yield url


def _creds() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def _keys(endpoint: str, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, **_creds())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def _s3_config(base_config: dict[str, Any], out: str) -> dict[str, Any]:
    return merge(base_config, {
        "model": {"uri": f"s3://{BUCKET}/models/tiny"},
        "dataset": {"uri": f"s3://{BUCKET}/data/text.jsonl"},
        "checkpoint": {"keepLast": 1},  # the resumed run's final save prunes the first run's checkpoint
        "output": {"uri": f"s3://{BUCKET}/{out}"},
    })


def _run(tmp_path: Path, name: str, config: dict[str, Any], endpoint: str, expect: int | None, **env: str) -> Run:
    """The pod command (launch preflight -> trainer), each run with an empty cache and staging dir."""
    import sys

    run = Run(tmp_path, name, config)
    run.config_path.write_text(json.dumps(config, indent=1))  # Run would point the output at a local dir
    extra = {**s3_env(endpoint), "KUBEFORGE_TRAIN_DUMP": str(run.dump_path),
             storage.CACHE_ENV: str(run.dir / "cache"), storage.STAGING_ENV: str(run.dir / "staging"), **env}
    cmd = [sys.executable, "-m", "kubeforge_runtime.launch", "--config", str(run.config_path), "--",
           sys.executable, "-m", "kubeforge_runtime.train", "--config", str(run.config_path)]
    return run.execute(cmd, child_env(**extra), expect=expect)


def test_s3_model_data_checkpoint_resume_and_output(endpoint: str, base_config: dict[str, Any], reference: Run,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _s3_config(base_config, "runs/a")
    # 1. Stopped by SIGTERM after step 2: the step-2 checkpoint is complete in the bucket, no output.
    first = _run(tmp_path, "first", cfg, endpoint, expect=None,
                 KUBEFORGE_FAULT_SIGTERM_AT_STEP="1", KUBEFORGE_FAULT_RANK="0")
    assert first.returncode == 143, first.log()[-4000:]
    keys = _keys(endpoint, "runs/a/")
    assert "runs/a/checkpoints/step-00000002/kubeforge-state.json" in keys, keys
    assert any(k.startswith("runs/a/checkpoints/step-00000002/") and k.endswith(".distcp") for k in keys), keys
    assert not any(k.startswith("runs/a/") and "checkpoints/" not in k for k in keys), "no output from a stopped run"

    # 2. A fresh pod (empty staging and cache dirs) resumes from the bucket and finishes: the same
    # numbers as four uninterrupted steps of the file:// reference run.
    second = _run(tmp_path, "second", cfg, endpoint, expect=0)
    log = second.log()
    assert '"event": "resume"' in log and '"step": 2' in log
    assert_same(second.dump(), reference.dump(), grads=False)
    keys = _keys(endpoint, "runs/a/")
    assert "runs/a/kubeforge.json" in keys and "runs/a/model.safetensors" in keys, keys
    assert not any("step-00000002" in k for k in keys), f"keepLast 1: the step-2 checkpoint is pruned: {keys}"
    assert "runs/a/checkpoints/step-00000004/kubeforge-state.json" in keys

    # 3. The merged output reads back from the bucket through the loader users' jobs use.
    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "reader-cache"))
    from kubeforge_runtime import models

    out_dir = storage.resolve(f"s3://{BUCKET}/runs/a")
    lineage = json.loads((out_dir / "kubeforge.json").read_text())
    assert lineage["baseModel"]["uri"] == f"s3://{BUCKET}/models/tiny" and lineage["steps"] == 4
    model = models.load_causal_lm(str(out_dir))
    params = dict(model.named_parameters())
    ref = reference.dump()["params"]
    name = next(iter(ref))
    assert params[name].detach().float().sub(ref[name].float()).abs().max() < 1e-5


def test_preflight_exits_78_naming_what_to_set_without_credentials(base_config: dict[str, Any], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from kubeforge_runtime import launch

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv(contract.ENV_REPORT_PATH, str(tmp_path / "termination-log"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(merge(base_config, {"output": {"uri": f"s3://{BUCKET}/x"}})))
    assert launch.main(["--config", str(path)]) == contract.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "output.uri" in err and "credentialsSecretRef" in err and "AWS_ACCESS_KEY_ID" in err, err


def test_preflight_accepts_s3_output_and_checkpoint_with_credentials(endpoint: str, base_config: dict[str, Any],
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeforge_runtime import launch

    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(contract.ENV_REPORT_PATH, str(tmp_path / "termination-log"))
    path = tmp_path / "config.json"
    cfg = _s3_config(base_config, "runs/preflight")
    cfg["checkpoint"]["uri"] = f"s3://{BUCKET}/ckpt/preflight"
    path.write_text(json.dumps(cfg))
    assert launch.main(["--config", str(path)]) == contract.EXIT_OK
    assert not os.path.exists(tmp_path / "termination-log")
