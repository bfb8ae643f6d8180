"""The pod contract from the runtime's side: preflight exit codes, exec, metrics, events."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from train_support import DATA, child_env, merge

from kubeforge_runtime import contract


def launch(config: dict[str, Any] | None, tmp_path: Path, *command: str, env: dict[str, str] | None = None,
           config_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    path = config_path or tmp_path / "config.json"
    if config is not None:
        path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "kubeforge_runtime.launch", "--config", str(path)]
    if command:
        cmd += ["--", *command]
    extra = {contract.ENV_REPORT_PATH: str(tmp_path / "termination-log"), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(**extra), timeout=120)


@pytest.fixture
def check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run the preflight in this process (fast: no interpreter start); exec is forbidden."""
    from kubeforge_runtime import launch as launch_mod

    def forbidden(*_: Any) -> None:
        raise AssertionError("the preflight passed and tried to exec")

    monkeypatch.setattr(launch_mod.os, "execvp", forbidden)

    def run(config: dict[str, Any], *command: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        # Never touch a real /dev/termination-log from a test.
        monkeypatch.setenv(contract.ENV_REPORT_PATH, str(tmp_path / "termination-log"))
        for key in ("PET_NNODES", "PET_NPROC_PER_NODE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        argv = ["--config", str(path)] + (["--", *command] if command else [])
        code = launch_mod.main(argv)
        return code, capsys.readouterr().err

    return run


@pytest.fixture
def cfg(base_config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return merge(base_config, {"output": {"uri": f"file://{tmp_path / 'out'}"}})


TORCHRUN = ("torchrun", "--nnodes=1", "--nproc-per-node=2", "-m", "kubeforge_runtime.train")


def test_valid_config_execs_the_command_and_passes_its_exit_code(cfg: dict[str, Any], tmp_path: Path,
                                                                 check: Any) -> None:
    res = launch(cfg, tmp_path, sys.executable, "-c", "import sys; print('child ran'); sys.exit(7)")
    assert res.returncode == 7 and "child ran" in res.stdout
    # No command: check only (in this process: the real process's exit status is shown above).
    code, err = check(cfg)
    assert code == contract.EXIT_OK, err


@pytest.mark.parametrize("change, words", [
    ({"trainingg": {}}, ["unknown key trainingg"]),
    ({"model": {"uri": "file:///nonexistent/model"}}, ["/nonexistent/model does not exist"]),
    ({"dataset": {"uri": "file:///nonexistent/data.jsonl"}}, ["does not exist"]),
    ({"parallelism": {"tensor": 3}}, ["does not divide the world size 2"]),
    ({"parallelism": {"tensor": 2, "pipeline": 2}}, ["does not divide the world size 2"]),
    ({"parallelism": {"strategy": "deepspeed-zero2", "pipeline": 2}}, ["data parallel only", "fsdp"]),
    # Refused before torchrun starts (inside the workers it would be exit 1 and a retry).
    ({"parallelism": {"strategy": "ddp", "tensor": 2}}, ["strategy ddp cannot be combined with parallelism.tensor",
                                                          "use strategy fsdp"]),
    ({"training": {"globalBatchSize": 6, "microBatchSize": 2}}, ["multiple of", "data-parallel degree (2)"]),
    # s3:// outputs are accepted with credentials (test_train_s3.py); a hub id is never writable.
    ({"output": {"uri": "hf://org/name"}}, ["outputs must be file://, pvc:// or s3://"]),
])
def test_configuration_errors_exit_78_with_a_message(cfg: dict[str, Any], check: Any, change: dict[str, Any],
                                                     words: list[str], tmp_path: Path) -> None:
    code, err = check(merge(cfg, change), *TORCHRUN)
    assert code == contract.EXIT_CONFIG_ERROR, err
    assert "configuration error" in err
    for w in words:
        assert w in err
    assert words[0] in (tmp_path / "termination-log").read_text()


def test_deepspeed_strategy_without_deepspeed_installed_exits_78(cfg: dict[str, Any], tmp_path: Path) -> None:
    """An image built without the deepspeed extra. A stand-in, named as such: a blocked
    import (sys.modules entry None) plays the missing package, which cannot be uninstalled
    from the shared test environment. Also the configuration error's exit status 78 through a
    real process (the other configuration errors are checked in this process, above)."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['deepspeed'] = None\n")
    res = launch(merge(cfg, {"parallelism": {"strategy": "deepspeed-zero3"}}), tmp_path, *TORCHRUN,
                 env={"PYTHONPATH": f"{blocker}:{child_env()['PYTHONPATH']}"})
    assert res.returncode == contract.EXIT_CONFIG_ERROR, res.stderr
    assert "needs the deepspeed package" in res.stderr and "kubeforge[deepspeed]" in res.stderr
    assert "or use 'fsdp'" in (tmp_path / "termination-log").read_text()


def test_model_sizes_are_checked_against_the_tensor_degree(cfg: dict[str, Any], check: Any) -> None:
    # 4 heads and 2 KV heads do not split 4 ways.
    code, err = check(merge(cfg, {"parallelism": {"tensor": 4}}), "torchrun", "--nproc-per-node=4", "x.py")
    assert code == 78 and "num_key_value_heads (2)" in err
    # The world size may also come from the PET_* environment the operator injects.
    code, err = check(merge(cfg, {"parallelism": {"tensor": 2}}), "torchrun", "x.py",
                      env={"PET_NNODES": "3", "PET_NPROC_PER_NODE": "1"})
    assert code == 78 and "world size 3" in err


def test_bad_records_fail_the_preflight_with_file_and_line(cfg: dict[str, Any], check: Any, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text((DATA / "text.jsonl").read_text() + '{"txt": "typo"}\n')
    code, err = check(merge(cfg, {"dataset": {"uri": f"file://{data}"}}), *TORCHRUN)
    assert code == 78 and f"{data}:401:" in err


def test_unreadable_config_file_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeforge_runtime import launch as launch_mod

    monkeypatch.setenv(contract.ENV_REPORT_PATH, str(tmp_path / "termination-log"))
    assert launch_mod.main(["--config", str(tmp_path / "missing.json"), "--", "true"]) == 78
    assert "cannot read config file" in capsys.readouterr().err


def test_trainer_alone_exits_78_on_a_layout_error(cfg: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(merge(cfg, {"parallelism": {"tensor": 2}})))
    res = subprocess.run([sys.executable, "-m", "kubeforge_runtime.train", "--config", str(path)],
                         capture_output=True, text=True, env=child_env(), timeout=120)
    assert res.returncode == 78 and "does not divide the world size 1" in res.stderr


# --- metrics and events -------------------------------------------------------------------------

def test_prometheus_endpoint_exports_the_contract_metrics() -> None:
    from kubeforge_runtime.train.metrics import Reporter

    rep = Reporter(enabled=True, port=0)
    try:
        assert rep.port
        rep.update(step=3, total_steps=10, epoch=0, loss=1.5, tokens_per_second=123.0, learning_rate=1e-4,
                   mfu=None, last_checkpoint=2)
        body = urllib.request.urlopen(f"http://127.0.0.1:{rep.port}/metrics", timeout=10).read().decode()
    finally:
        rep.close()
    values = {line.split()[0]: float(line.split()[1]) for line in body.splitlines() if line and not line.startswith("#")}
    assert values[contract.METRIC_STEP] == 3 and values[contract.METRIC_TOTAL_STEPS] == 10
    assert values[contract.METRIC_LOSS] == 1.5 and values[contract.METRIC_TOKENS_PER_SECOND] == 123
    assert values[contract.METRIC_LEARNING_RATE] == 1e-4 and values[contract.METRIC_LAST_CHECKPOINT_STEP] == 2
    for name in (contract.METRIC_EPOCH, contract.METRIC_MFU):
        assert name in values
    Reporter(enabled=False).update(step=1)  # other ranks: a no-op


def test_prometheus_endpoint_names_the_job_from_the_operators_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from kubeforge_runtime.train.metrics import Reporter

    def served() -> list[tuple[str, dict[str, str], float]]:
        rep = Reporter(enabled=True, port=0)
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{rep.port}/metrics", timeout=10).read().decode()
        finally:
            rep.close()
        return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(body) for s in f.samples
                if s.name == contract.METRIC_JOB]

    monkeypatch.delenv(contract.ENV_NAMESPACE, raising=False)
    monkeypatch.delenv(contract.ENV_JOB_NAME, raising=False)
    assert served() == []  # outside a FineTuneJob's pod: no identity to claim
    monkeypatch.setenv(contract.ENV_NAMESPACE, "ml")
    monkeypatch.setenv(contract.ENV_JOB_NAME, "ft")
    assert served() == [(contract.METRIC_JOB, {"namespace": "ml", "name": "ft"}, 1.0)]


def test_events_are_prefixed_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    from kubeforge_runtime.train.metrics import emit_event

    emit_event("step", step=1, totalSteps=4, loss=2.0)
    line = capsys.readouterr().out
    assert line.startswith(contract.LOG_EVENT_PREFIX) and line.endswith("\n")
    payload = json.loads(line[len(contract.LOG_EVENT_PREFIX):])
    assert payload["event"] == "step" and payload["totalSteps"] == 4


def test_mfu_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeforge_runtime.train import metrics

    monkeypatch.delenv(metrics.ENV_PEAK_FLOPS, raising=False)
    assert metrics.peak_flops_per_device("bf16") is None  # a CPU has no known peak: no MFU
    monkeypatch.setenv(metrics.ENV_PEAK_FLOPS, "1e12")
    assert metrics.peak_flops_per_device("fp32") == 1e12
    assert metrics.flops_per_token(1000, 2, 8, 16) == 6000 + 12 * 2 * 8 * 16


def test_offline_hub_id_fails_at_once(cfg: dict[str, Any], check: Any) -> None:
    import time

    began = time.monotonic()
    code, err = check(merge(cfg, {"model": {"uri": "hf://example-org/no-such-model"}}), *TORCHRUN,
                      env={"HF_HUB_OFFLINE": "1"})
    assert code == 78 and "HF_HUB_OFFLINE" in err and "pvc://" in err
    assert time.monotonic() - began < 30


# --- resuming only this run's checkpoints -------------------------------------------------------

def _fake_checkpoint(root: Path, step: int, identity: dict[str, Any] | None) -> Path:
    """A complete-looking checkpoint directory (state file plus a shard) as another run left it."""
    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"someone else's weights")
    state: dict[str, Any] = {"step": step, "losses": [1.0] * step}
    if identity is not None:
        state["identity"] = identity
    (path / "kubeforge-state.json").write_text(json.dumps(state))
    return path


def _identity_of(config: dict[str, Any]) -> dict[str, Any]:
    from kubeforge_runtime.train import checkpoint
    from kubeforge_runtime.train.config import parse_config

    return checkpoint.run_identity(parse_config(config))


def test_another_runs_checkpoint_is_refused_with_78_and_nothing_deleted(cfg: dict[str, Any], check: Any,
                                                                      tmp_path: Path) -> None:
    root = tmp_path / "out" / "checkpoints"
    theirs = merge(cfg, {"name": "other-job", "dataset": {"uri": f"file://{DATA / 'prompt_completion.jsonl'}"}})
    old = [_fake_checkpoint(root, 2, _identity_of(theirs)), _fake_checkpoint(root, 4, _identity_of(theirs))]
    code, err = check(cfg)
    assert code == contract.EXIT_CONFIG_ERROR, err
    assert "another run's checkpoints (newest: step-00000004)" in err
    assert "job (namespace/name) is 'default/test' here but 'default/other-job'" in err
    assert "dataset.uri is" in err and "prompt_completion.jsonl" in err
    assert "model.uri" not in err and "method" not in err  # only what differs is named
    assert "Use a fresh checkpoint directory" in err
    assert all((p / "__0_0.distcp").exists() and (p / "kubeforge-state.json").exists() for p in old)


def test_this_runs_checkpoint_passes_also_spelled_differently(cfg: dict[str, Any], check: Any, tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "out" / "checkpoints", 4, _identity_of(cfg))
    respelled = merge(cfg, {"model": {"uri": cfg["model"]["uri"] + "/"},
                            "dataset": {"uri": cfg["dataset"]["uri"].replace("/examples/", "/examples/./")}})
    assert check(respelled)[0] == contract.EXIT_OK
    # The layout is not part of the identity: a checkpoint reshards onto any layout.
    assert check(merge(cfg, {"parallelism": {"strategy": "ddp"}}))[0] == contract.EXIT_OK


def test_a_lora_checkpoint_of_another_rank_is_refused(cfg: dict[str, Any], check: Any, tmp_path: Path) -> None:
    lora = merge(cfg, {"method": "lora", "lora": {"r": 4}})
    _fake_checkpoint(tmp_path / "out" / "checkpoints", 4, _identity_of(lora))
    code, err = check(merge(lora, {"lora": {"r": 8}}))
    assert code == contract.EXIT_CONFIG_ERROR and "lora (r, alpha, targetModules)" in err


def test_a_checkpoint_without_identity_still_resumes(cfg: dict[str, Any], check: Any, tmp_path: Path) -> None:
    # Written before identities were recorded: accepted (with a warning), not refused.
    _fake_checkpoint(tmp_path / "out" / "checkpoints", 4, None)
    assert check(cfg)[0] == contract.EXIT_OK


def test_the_trainer_records_its_identity_and_refuses_another_runs_checkpoint(cfg: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    """The trainer alone (a world of one, no preflight): a real run writes its identity with
    each checkpoint; a second run of another job in the same directory exits 78 at resume,
    before loading anything, and every checkpoint of the first run is kept."""
    def train(config: dict[str, Any], name: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        return subprocess.run([sys.executable, "-m", "kubeforge_runtime.train", "--config", str(path)],
                              capture_output=True, text=True, env=child_env(), timeout=300)

    first = merge(cfg, {"training": {"maxSteps": 2}, "checkpoint": {"intervalSteps": 1, "keepLast": 2}})
    res = train(first, "first")
    assert res.returncode == 0, res.stderr[-3000:]
    root = tmp_path / "out" / "checkpoints"
    kept = {p: sorted(f.name for f in p.iterdir()) for p in root.iterdir()}
    assert [p.name for p in sorted(kept)] == ["step-00000001", "step-00000002"]
    state = json.loads((root / "step-00000002" / "kubeforge-state.json").read_text())
    assert state["identity"] == _identity_of(first)

    res = train(merge(first, {"name": "stranger", "training": {"maxSteps": 4}}), "stranger")
    assert res.returncode == contract.EXIT_CONFIG_ERROR, res.stderr[-3000:]
    assert "job (namespace/name) is 'default/stranger' here but 'default/test' in the checkpoint" in res.stderr
    assert {p: sorted(f.name for f in p.iterdir()) for p in root.iterdir()} == kept
# --- data red lines (dataset.checks) ----------------------------------------------------------

def _pc_data(tmp_path: Path, yes: int, no: int, bad: int = 0) -> Path:
    path = tmp_path / "labels.jsonl"
    lines = [json.dumps({"prompt": f"review {i}: positive?", "completion": "yes" if i < yes else "no"})
             for i in range(yes + no)] + ["{broken"] * bad
    path.write_text("\n".join(lines) + "\n")
    return path


def _checks(cfg: dict[str, Any], path: Path, checks: dict[str, Any]) -> dict[str, Any]:
    return merge(cfg, {"dataset": {"uri": f"file://{path}", "format": "prompt-completion", "checks": checks}})


def test_crossed_data_red_line_exits_78_with_a_report_before_torchrun(cfg: dict[str, Any], tmp_path: Path) -> None:
    """The pod's real entry point as a process: a red line crossed is exit 78, torchrun (here a
    command that would leave a marker) never starts, and the termination log holds the
    DataQualityReport the operator reads."""
    marker = tmp_path / "worker-started"
    res = launch(_checks(cfg, _pc_data(tmp_path, yes=10, no=3), {"maxLabelImbalance": 3, "minRecords": 5}),
                 tmp_path, sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    assert res.returncode == contract.EXIT_CONFIG_ERROR, res.stderr
    assert not marker.exists()
    assert "maxLabelImbalance: labelImbalance 3.33333 is above the threshold 3" in res.stderr
    report = json.loads((tmp_path / "termination-log").read_text())
    assert report["kind"] == contract.DATA_QUALITY_REPORT_KIND and report["passed"] is False
    assert report["thresholds"] == {"maxLabelImbalance": 3, "minRecords": 5}
    assert report["measurements"]["labelImbalance"] == pytest.approx(10 / 3, abs=1e-6)
    assert report["measurements"]["records"] == 13 and "overlongShare" in report["measurements"]
    assert report["violations"] == ["maxLabelImbalance: labelImbalance 3.33333 is above the threshold 3"]
    assert "labelImbalance 3.33333" in report["message"]


def test_passing_data_red_lines_reach_the_execed_command(cfg: dict[str, Any], tmp_path: Path) -> None:
    """Passing measurements are logged and handed on in $KUBEFORGE_DATA_QUALITY (the trainer puts
    them in its result and lineage); a value from elsewhere never leaks through."""
    show = ("import os, sys; sys.stdout.write(os.environ.get('KUBEFORGE_DATA_QUALITY', 'unset'))",)
    res = launch(_checks(cfg, _pc_data(tmp_path, yes=9, no=3), {"maxLabelImbalance": 3, "maxOverlongShare": 0}),
                 tmp_path, sys.executable, "-c", *show)
    assert res.returncode == 0, res.stderr
    quality = json.loads(res.stdout)
    assert quality["passed"] is True and quality["violations"] == []
    assert quality["measurements"]["labelImbalance"] == 3 and quality["measurements"]["overlongShare"] == 0
    assert quality["measurements"]["sequenceLength"] == 32
    assert "data checks passed" in res.stderr and "labelImbalance 3" in res.stderr
    res = launch(cfg, tmp_path, sys.executable, "-c", *show, env={contract.ENV_DATA_QUALITY: '{"passed": true}'})
    assert res.returncode == 0 and res.stdout == "unset"


def test_bad_lines_under_max_unparseable_share_are_skipped_over_it_fail(cfg: dict[str, Any], check: Any,
                                                                         tmp_path: Path) -> None:
    # 2 bad lines of 20: a share of 0.1.
    path = _pc_data(tmp_path, yes=9, no=9, bad=2)
    with pytest.raises(AssertionError, match="tried to exec"):  # passed the gate (exec is forbidden here)
        check(_checks(cfg, path, {"maxUnparseableShare": 0.1}), *TORCHRUN)
    code, err = check(_checks(cfg, path, {"maxUnparseableShare": 0.05}), *TORCHRUN)
    assert code == contract.EXIT_CONFIG_ERROR
    assert "maxUnparseableShare: unparseableShare 0.1 is above the threshold 0.05" in err
    # Without the line, any bad line is still an error (file:line listed), as before.
    code, err = check(_checks(cfg, path, {"minRecords": 1}), *TORCHRUN)
    assert code == contract.EXIT_CONFIG_ERROR and f"{path}:19:" in err


def test_a_real_run_through_the_gate_trains_on_the_parseable_records_and_reports_the_measurements(
        launcher: Any, tmp_path: Path) -> None:
    """launch.py -> trainer, as the pod runs it: maxUnparseableShare lets 1 bad line of 61 through,
    the trainer skips it, and the preflight's measurements reach the result and the lineage."""
    from kubeforge_runtime import models

    lines = (DATA / "prompt_completion.jsonl").read_text().splitlines()[:60] + ["{broken"]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = tmp_path / "termination-log"
    run = launcher("data-gate", {
        "dataset": {"uri": f"file://{path}", "format": "prompt-completion", "packing": False, "sequenceLength": 32,
                    "checks": {"maxUnparseableShare": 0.02, "minRecords": 50}},
        "training": {"maxSteps": 2},
    }, 0, via_launch=True, dump=False, env={contract.ENV_REPORT_PATH: str(report)})
    assert "skipping 1 bad record(s)" in run.log()
    result = json.loads(report.read_text())
    assert result["kind"] == contract.RESULT_KIND and result["steps"] == 2
    quality = result["dataQuality"]
    assert quality["passed"] is True and quality["thresholds"] == {"maxUnparseableShare": 0.02, "minRecords": 50}
    assert quality["measurements"]["records"] == 60 and quality["measurements"]["unparseableRecords"] == 1
    lineage = json.loads((run.out / models.LINEAGE_FILE).read_text())
    assert lineage["dataset"]["quality"] == quality
    assert lineage["dataset"]["trainRecords"] + lineage["dataset"]["validationRecords"] == 60


def test_fit_check_with_the_gpu_memory_the_operator_passes(check, cfg: dict[str, Any]) -> None:
    """$KUBEFORGE_GPU_MEMORY: the preflight estimates the peak from the local config.json and
    refuses (78) a layout that cannot fit, naming the estimate, the limit and a layout that fits."""
    full = merge(cfg, {"method": "full", "training": {"microBatchSize": 4, "globalBatchSize": 8}})
    code, err = check(full, *TORCHRUN, env={contract.ENV_GPU_MEMORY: "2000000 (resources.gpuMemory 2000000)"})
    assert code == contract.EXIT_CONFIG_ERROR, err
    assert "spec.resources: this layout does not fit: estimated peak" in err
    assert "exceeds 0.00 GiB (resources.gpuMemory 2000000)" in err and "the nearest layout that fits" in err
    with pytest.raises(AssertionError, match="tried to exec"):  # fits: the preflight passes on to torchrun
        check(full, *TORCHRUN, env={contract.ENV_GPU_MEMORY: f"{80 * 2**30} (resources.gpuMemory 80Gi)"})


# --- the data gate pod (launch --data-check) ----------------------------------------------------

def gate(config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``python -m kubeforge_runtime.launch --config ... --data-check``: the gate pod's command."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "kubeforge_runtime.launch", "--config", str(path), "--data-check"]
    env = child_env(**{contract.ENV_REPORT_PATH: str(tmp_path / "termination-log")})
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_data_gate_exits_78_with_the_report_when_a_line_is_crossed(cfg: dict[str, Any], tmp_path: Path) -> None:
    res = gate(_checks(cfg, _pc_data(tmp_path, yes=10, no=3), {"maxLabelImbalance": 3, "minRecords": 5}), tmp_path)
    assert res.returncode == contract.EXIT_CONFIG_ERROR, res.stderr
    assert "maxLabelImbalance: labelImbalance 3.33333 is above the threshold 3" in res.stderr
    report = json.loads((tmp_path / "termination-log").read_text())
    assert report["kind"] == contract.DATA_QUALITY_REPORT_KIND and report["passed"] is False
    assert report["violations"] == ["maxLabelImbalance: labelImbalance 3.33333 is above the threshold 3"]
    assert report["measurements"]["records"] == 13


def test_data_gate_passes_with_the_measurements_in_the_termination_log(cfg: dict[str, Any], tmp_path: Path) -> None:
    """Exit 0 and a passing report (the operator records it as status.result.dataQuality);
    maxOverlongShare loads the model's tokenizer, as the trainer tokenises."""
    res = gate(_checks(cfg, _pc_data(tmp_path, yes=9, no=3), {"maxLabelImbalance": 3, "maxOverlongShare": 0}),
               tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "termination-log").read_text())
    assert report["kind"] == contract.DATA_QUALITY_REPORT_KIND and report["passed"] is True
    assert report["violations"] == [] and report["thresholds"] == {"maxLabelImbalance": 3, "maxOverlongShare": 0}
    assert report["measurements"]["labelImbalance"] == 3 and report["measurements"]["overlongShare"] == 0
    assert report["measurements"]["sequenceLength"] == 32
    assert "data checks passed" in res.stderr


def test_data_gate_needs_no_model_without_max_overlong_share(cfg: dict[str, Any], tmp_path: Path) -> None:
    """The gate pod fetches no model unless maxOverlongShare needs its tokenizer: a model URI
    that does not exist is not looked at; with maxOverlongShare it is, and the error says so."""
    missing = merge(cfg, {"model": {"uri": f"file://{tmp_path / 'no-model'}"}})
    res = gate(_checks(missing, _pc_data(tmp_path, yes=5, no=5), {"maxLabelImbalance": 2}), tmp_path)
    assert res.returncode == 0, res.stderr
    assert "overlongShare" not in json.loads((tmp_path / "termination-log").read_text())["measurements"]
    res = gate(_checks(missing, _pc_data(tmp_path, yes=5, no=5), {"maxOverlongShare": 0.1}), tmp_path)
    assert res.returncode == contract.EXIT_CONFIG_ERROR and "no-model" in res.stderr


def test_data_gate_without_checks_or_with_a_missing_file_exits_78_with_a_message(cfg: dict[str, Any],
                                                                                tmp_path: Path) -> None:
    res = gate(cfg, tmp_path)
    assert res.returncode == contract.EXIT_CONFIG_ERROR and "dataset.checks is not set" in res.stderr
    res = gate(_checks(cfg, tmp_path / "absent.jsonl", {"minRecords": 1}), tmp_path)
    assert res.returncode == contract.EXIT_CONFIG_ERROR and "absent.jsonl" in res.stderr
    assert "DataQualityReport" not in (tmp_path / "termination-log").read_text()
