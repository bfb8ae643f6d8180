"""FineTuneJob on the real control plane: children, scheduling, status, failures, lifecycle.

One operator process (and namespace) serves the whole module; every test uses its own
FineTuneJob. kwok plays the kubelet: pods go Running/Ready at once, a test ends a worker
with an exit code by annotation, and disruptions go through the real Eviction API.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kubeforge_runtime import contract
from support.cluster import GPU_NODES, LOOPBACK_POD_RANGE, POD_RANGE, pod_range_is_local
from support.finetune import Env, ftj, make_env, wait_metrics_up
from support.waiting import get_json, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory) -> Iterator[Env]:
    yield from make_env(cluster, tmp_path_factory.mktemp("finetune-lifecycle"))


@pytest.fixture(autouse=True)
def _operator_log_on_failure(request, env):
    request.node._kubeforge_logs = [str(env.operator.log_path)]


def owned_by(obj: dict, owner: dict) -> bool:
    return any(o["uid"] == owner["metadata"]["uid"] and o.get("controller") for o in obj["metadata"]["ownerReferences"])


def test_two_node_job_gets_service_configmap_job_and_runs_on_gpu_nodes(env: Env):
    env.apply(ftj("basic", gpus=8))
    st = env.wait_running("basic")
    owner = env.get("finetunejob", "basic")

    svc = env.get("service", "basic")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    cm = env.get("configmap", "basic-config")
    config = json.loads(cm["data"][contract.CONFIG_FILE])
    assert set(config) == {"kind", "name", "namespace", "model", "dataset", "method", "lora", "parallelism",
                           "training", "checkpoint", "output"}
    assert config["model"] == {"uri": "hf://acme/tiny-llama@main"} and config["namespace"] == env.namespace
    job = env.get("job", "basic")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert all(owned_by(o, owner) for o in (svc, cm, job))

    pods = env.pods("basic")
    assert len(pods) == 2
    nodes = {p["spec"]["nodeName"] for p in pods}
    # 8 GPUs each on 8-GPU nodes: the scheduler had to put them on two different GPU nodes.
    assert len(nodes) == 2 and nodes <= set(GPU_NODES)
    for pod in pods:
        c = pod["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert pod["spec"]["hostname"] == f"basic-{pod['metadata']['annotations']['batch.kubernetes.io/job-completion-index']}"
        assert pod["spec"]["subdomain"] == "basic"
    # The Service selects the index-0 worker only (basic-0.basic, the rendezvous host), by the
    # label the real Job controller puts on each pod. (Its EndpointSlice stays empty here: kwok's
    # pod IPs are loopback addresses, which the API server refuses in endpoints.)
    rank0 = next(p for p in pods if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0")
    selector = ",".join(f"{k}={v}" for k, v in svc["spec"]["selector"].items())
    selected = get_json(env.cluster, "-n", env.namespace, "pods", "-l", selector)["items"]
    assert [p["metadata"]["name"] for p in selected] == [rank0["metadata"]["name"]]

    assert st["workers"] == {"ready": 2, "total": 2, "min": 2, "max": 2}
    assert st["observedGeneration"] == 1 and st["startTime"]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Accepted"]["status"] == conds["Created"]["status"] == conds["Running"]["status"] == "True"
    # One Event for the new job (accepted, children created); its first start is in the status.
    assert [r for r in env.event_reasons("basic") if r in ("Accepted", "Created", "Running")] == ["Accepted"]
    # Without spec.dataset.checks there is no data gate: nothing to wait for, nothing to pay.
    assert env.get("job", "basic-datacheck") is None
    assert not any(c["type"] == "DataChecked" for c in st["conditions"])
    # Give the two whole GPU nodes back (the other tests' workers take one GPU each).
    env.delete("finetunejob", "basic")


def test_workers_that_fit_no_gpu_node_stay_pending_with_the_schedulers_reason(env: Env):
    env.apply(ftj("toobig", gpus=16))  # the nodes have 8 GPUs each
    cond = wait_for(lambda: (c := env.condition("toobig", "Running")) and c["reason"] == "Unschedulable" and c, 30,
                    what="Unschedulable reason")
    assert env.status("toobig")["phase"] == "Pending" and "nvidia.com/gpu" in cond["message"]
    env.delete("finetunejob", "toobig")


def test_all_workers_succeeding_sets_succeeded_and_it_stays_terminal(env: Env):
    env.apply(ftj("done"))
    env.wait_running("done")
    for pod in env.pods("done"):
        env.exit_pod(pod, 0)
    st = env.wait_phase("done", "Succeeded", 60)
    assert st["completionTime"]
    assert st["output"] == {"uri": "s3://models/done"}
    succeeded = next(c for c in st["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and succeeded["reason"] == "Completed"
    assert next(c for c in st["conditions"] if c["type"] == "Running")["status"] == "False"
    assert "Succeeded" in env.event_reasons("done")

    # Never resurrected: a spec change to a finished job starts nothing.
    job_before = env.get("job", "done")
    env.patch_spec("done", {"training": {"learningRate": 0.001}})
    wait_for(lambda: env.status("done").get("observedGeneration") == 2, 30, what="generation 2 observed")
    assert env.status("done")["phase"] == "Succeeded"
    assert env.status("done")["completionTime"] == st["completionTime"]
    assert env.pods("done") == []
    assert env.get("job", "done")["metadata"]["resourceVersion"] == job_before["metadata"]["resourceVersion"]


def test_the_trainers_result_lands_in_status(env: Env):
    # Global rank 0 writes its compact result to the termination log (kwok plays that part here).
    env.apply(ftj("result", evaluation={"uri": "s3://data/test.jsonl", "metric": "accuracy"},
                  dataset={"uri": "s3://data/train.jsonl", "format": "prompt-completion"}))
    env.wait_running("result")
    message = json.dumps({"kind": "FineTuneJobResult", "steps": 8, "finalLoss": 0.21, "initialValidationLoss": None,
                          "evaluation": {"metric": "accuracy", "before": 0.36, "after": 0.95, "samples": 100}})
    first, second = sorted(env.pods("result"), key=lambda p: p["metadata"]["name"])
    env.exit_pod(first, 0, message)
    env.exit_pod(second, 0)
    st = env.wait_phase("result", "Succeeded", 60)
    assert st["result"] == {"steps": 8, "finalLoss": 0.21,
                            "evaluation": {"metric": "accuracy", "before": 0.36, "after": 0.95, "samples": 100}}


def test_retryable_worker_failure_restarts_then_runs_again(env: Env):
    env.apply(ftj("flaky", backoffLimit=3))
    env.wait_running("flaky")
    env.exit_pod(env.pods("flaky")[0], 1, "RuntimeError: NCCL watchdog timeout")

    st = env.wait_phase("flaky", "Restarting", 30)
    assert st["restarts"] == 1
    restarting = next(c for c in st["conditions"] if c["type"] == "Restarting")
    assert restarting["status"] == "True" and restarting["reason"] == "WorkerFailed"
    assert "exited with code 1" in restarting["message"] and "NCCL watchdog timeout" in restarting["message"]

    # The Job controller replaces the pod (after its back-off) and the job runs again.
    st = env.wait_running("flaky", timeout=90)
    assert st["restarts"] == 1
    restarting = next(c for c in st["conditions"] if c["type"] == "Restarting")
    assert restarting["status"] == "False" and restarting["reason"] == "Recovered"
    assert env.get("job", "flaky")["status"].get("failed") == 1
    reasons = env.event_reasons("flaky")
    assert reasons.index("Restarting") < len(reasons) - 1 - reasons[::-1].index("Running")


def test_disruption_is_not_counted_against_backoff_limit(env: Env):
    # backoffLimit 0: one counted failure would fail the job outright.
    env.apply(ftj("drained", backoffLimit=0))
    env.wait_running("drained")
    env.evict(env.pods("drained")[1])

    st = wait_for(lambda: (s := env.status("drained")).get("restarts") == 1 and s, 30, what="disruption counted")
    assert st["phase"] in ("Restarting", "Running")
    assert any(c["type"] == "Restarting" and c["reason"] == "WorkerDisrupted" for c in st["conditions"])
    st = env.wait_running("drained", timeout=90)
    job = env.get("job", "drained")
    assert not job["status"].get("failed"), job["status"]
    assert not any(c["type"] in ("Failed", "FailureTarget") for c in job["status"].get("conditions", []))
    assert st["restarts"] == 1 and "WorkerDisrupted" in env.event_reasons("drained")


def test_configuration_error_exit_code_fails_the_job_at_once(env: Env):
    env.apply(ftj("badconfig", backoffLimit=5))
    env.wait_running("badconfig")
    env.exit_pod(env.pods("badconfig")[1], contract.EXIT_CONFIG_ERROR,
                 "config error: dataset.format: 'csv' is not one of ['text', 'prompt-completion', 'chat']")
    st = env.wait_phase("badconfig", "Failed", 60)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "ConfigurationError"
    assert "exited with code 78" in failed["message"] and "dataset.format" in failed["message"]
    assert st["completionTime"]
    # The podFailurePolicy failed the Job itself: no retries although backoffLimit is 5.
    wait_for(lambda: any(c["type"] == "Failed" and c["status"] == "True"
                         for c in env.get("job", "badconfig")["status"].get("conditions", [])), 60, what="Job failed")
    assert env.pods("badconfig") == []
    assert "ConfigurationError" in env.event_reasons("badconfig")


def _red_line_file(tmp_path) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i % 7}", "completion": "yes" if i % 10 else "no"}) + "\n"
                            for i in range(10)))
    return str(path)


def _gate_pod_running(env: Env, name: str) -> dict:
    return wait_for(lambda: (p := env.gate_pods(name)) and p[0]["status"].get("phase") == "Running" and p[0], 60,
                    what=f"{name}'s data check pod running")


def test_crossed_data_red_line_fails_the_job_before_any_worker_is_created(env: Env, tmp_path):
    """With spec.dataset.checks the operator first runs one small CPU pod, the data gate; a
    crossed line fails the FineTuneJob with DataQualityFailed and no worker Job, Service or pod
    ever exists. kwok plays the kubelet, so the pod never runs its command: the message it ends
    with is the one ``launch --data-check`` writes, produced here by the runtime's own datacheck
    on a real file (tests/unit/runtime/train/test_train_launch.py runs that entry point itself)."""
    from kubeforge_runtime import datacheck

    checks = {"maxDuplicateShare": 0.1, "maxLabelImbalance": 3, "minRecords": 4}
    env.apply(ftj("dirtydata", backoffLimit=5,
                  dataset={"uri": "s3://data/train.jsonl", "format": "prompt-completion", "checks": checks}))
    gate_pod = _gate_pod_running(env, "dirtydata")
    st = env.wait_phase("dirtydata", "Pending", 30)
    checked = next(c for c in st["conditions"] if c["type"] == "DataChecked")
    assert checked["status"] == "Unknown" and checked["reason"] == "DataCheckRunning"
    assert next(c for c in st["conditions"] if c["type"] == "Created")["reason"] == "WaitingForDataCheck"
    # One small pod without a GPU, hardened like the workers, covered by the workers' NetworkPolicy.
    (c,) = gate_pod["spec"]["containers"]
    assert c["command"][-1] == "--data-check" and "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert c["securityContext"]["runAsNonRoot"] is True and gate_pod["spec"]["automountServiceAccountToken"] is False
    policy = env.get("networkpolicy", "dirtydata")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= gate_pod["metadata"]["labels"].items()
    # The thresholds reach the gate's config as the spec has them.
    rendered = json.loads(env.get("configmap", "dirtydata-config")["data"]["config.json"])
    assert rendered["dataset"]["checks"] == checks
    assert env.get("job", "dirtydata") is None and env.get("service", "dirtydata") is None

    report = datacheck.check_file(_red_line_file(tmp_path), "prompt-completion", checks)
    assert [v.check for v in report.violations] == ["maxDuplicateShare", "maxLabelImbalance"]
    env.exit_pod(gate_pod, contract.EXIT_CONFIG_ERROR, report.termination_report())

    st = env.wait_phase("dirtydata", "Failed", 60)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "DataQualityFailed"
    assert "before any worker was created" in failed["message"]
    assert "duplicateShare 0.2 is above the threshold 0.1" in failed["message"]
    assert "labelImbalance 9 is above the threshold 3" in failed["message"]
    dq = st["result"]["dataQuality"]
    assert dq["passed"] is False and dq["thresholds"] == checks
    assert dq["measurements"]["duplicateShare"] == 0.2 and dq["measurements"]["labelImbalance"] == 9
    assert dq["measurements"]["records"] == 10 and len(dq["violations"]) == 2
    reasons = env.event_reasons("dirtydata")
    assert "DataQualityFailed" in reasons and "Created" not in reasons
    # The podFailurePolicy failed the gate at once (no retry of exit 78)...
    wait_for(lambda: any(c["type"] == "Failed" and c["status"] == "True"
                         for c in env.get("job", "dirtydata-datacheck")["status"].get("conditions", [])), 60,
             what="gate Job failed")
    assert len(env.gate_pods("dirtydata", active_only=False)) == 1
    # ...and no worker ever: no Job, no Service, no worker pod, then or a while later.
    time.sleep(2)
    assert env.get("job", "dirtydata") is None and env.get("service", "dirtydata") is None
    assert env.pods("dirtydata", active_only=False) == []
    assert not st.get("restarts") and env.status("dirtydata")["phase"] == "Failed"


def test_passing_data_gate_records_the_measurements_then_creates_the_workers(env: Env, tmp_path):
    from kubeforge_runtime import datacheck

    checks = {"maxDuplicateShare": 0.5, "maxLabelImbalance": 10, "minRecords": 4}
    env.apply(ftj("cleandata", dataset={"uri": "s3://data/train.jsonl", "format": "prompt-completion",
                                        "checks": checks}))
    first = _gate_pod_running(env, "cleandata")
    assert env.get("job", "cleandata") is None
    # A gate Job deleted before it decided is put back (not a job stuck Pending).
    uid = env.get("job", "cleandata-datacheck")["metadata"]["uid"]
    env.delete("job", "cleandata-datacheck")
    wait_for(lambda: (j := env.get("job", "cleandata-datacheck")) and j["metadata"]["uid"] != uid, 60,
             what="the gate Job re-created")
    gate_pod = wait_for(lambda: next((p for p in env.gate_pods("cleandata")
                                      if p["metadata"]["uid"] != first["metadata"]["uid"]
                                      and p["status"].get("phase") == "Running"), None), 60,
                        what="the new gate pod running")
    assert env.get("job", "cleandata") is None
    report = datacheck.check_file(_red_line_file(tmp_path), "prompt-completion", checks)
    assert report.passed
    env.exit_pod(gate_pod, 0, report.termination_report())

    st = env.wait_running("cleandata", timeout=90)
    checked = next(c for c in st["conditions"] if c["type"] == "DataChecked")
    assert checked["status"] == "True" and checked["reason"] == "DataCheckPassed"
    assert "labelImbalance 9" in checked["message"]
    dq = st["result"]["dataQuality"]
    assert dq["passed"] is True and dq["violations"] == [] and dq["thresholds"] == checks
    assert dq["measurements"]["records"] == 10 and dq["measurements"]["labelImbalance"] == 9
    assert env.get("service", "cleandata") is not None and len(env.pods("cleandata")) == 2
    # (Events are ordered to the second only; the order within one sync is the unit tests'.)
    assert {"DataCheckPassed", "Created"} <= set(env.event_reasons("cleandata"))
    # The gate's pod is done; only the workers are running.
    assert env.gate_pods("cleandata") == []
    env.delete("finetunejob", "cleandata")


def test_backoff_limit_exceeded_fails_the_job(env: Env):
    env.apply(ftj("crashy", backoffLimit=0))
    env.wait_running("crashy")
    env.exit_pod(env.pods("crashy")[0], 137)
    st = env.wait_phase("crashy", "Failed", 60)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded", failed
    assert "exited with code 137" in failed["message"]


def test_suspend_deletes_workers_and_resume_continues(env: Env):
    env.apply(ftj("pausable"))
    env.wait_running("pausable")
    env.patch_spec("pausable", {"suspend": True})
    st = env.wait_phase("pausable", "Suspended", 30)
    assert env.get("job", "pausable")["spec"]["suspend"] is True
    wait_for(lambda: env.pods("pausable") == [], 30, what="workers deleted")
    assert next(c for c in st["conditions"] if c["type"] == "Suspended")["status"] == "True"

    env.patch_spec("pausable", {"suspend": False})
    st = env.wait_running("pausable", timeout=60)
    assert env.get("job", "pausable")["spec"]["suspend"] is False
    assert next(c for c in st["conditions"] if c["type"] == "Suspended")["reason"] == "Resumed"
    assert not st.get("restarts"), "pods stopped by a suspend are not worker failures"
    # Same Job, same rendezvous id: the trainer resumes from its checkpoint directory.
    # Its first start posts no Event; the return to Running after the suspend does.
    assert {"Suspended", "Running"} <= set(env.event_reasons("pausable"))


def test_active_deadline_fails_with_deadline_exceeded(env: Env):
    env.apply(ftj("slow", activeDeadlineSeconds=3))
    env.wait_running("slow")
    st = env.wait_phase("slow", "Failed", 60)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DeadlineExceeded" and "activeDeadlineSeconds" in failed["message"]


def test_ttl_deletes_the_finished_job_and_its_children(env: Env):
    env.apply(ftj("shortlived", ttlSecondsAfterFinished=2))
    env.wait_running("shortlived")
    for pod in env.pods("shortlived"):
        env.exit_pod(pod, 0)
    env.wait_phase("shortlived", "Succeeded", 60)
    wait_for(lambda: env.get("finetunejob", "shortlived") is None, 30, what="FineTuneJob deleted by TTL")
    wait_for(lambda: env.get("job", "shortlived") is None and env.get("service", "shortlived") is None
             and env.get("configmap", "shortlived-config") is None, 60, what="children garbage-collected")


def test_deleting_the_job_garbage_collects_its_children(env: Env):
    env.apply(ftj("doomed"))
    env.wait_running("doomed")
    env.delete("finetunejob", "doomed")
    wait_for(lambda: env.get("job", "doomed") is None and env.get("service", "doomed") is None
             and env.get("configmap", "doomed-config") is None, 60, what="children garbage-collected")
    wait_for(lambda: env.pods("doomed", active_only=False) == [], 60, what="worker pods gone")


def test_names_unusable_for_children_are_refused(env: Env):
    # Too long for <name>-<index> host names: the API server refuses it (the CRD's CEL rule).
    out = env.cluster.kubectl("apply", "-n", env.namespace, "-f", "-", input=yaml.safe_dump(ftj("n" * 53)))
    assert out.returncode != 0 and "at most 52 characters" in out.stderr
    # A dot is a valid object name but not a Service name: Invalid, reported once, no children.
    env.apply(ftj("has.dot"))
    cond = wait_for(lambda: env.condition("has.dot", "Accepted"), 30, what="Accepted condition")
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec" and "no dots" in cond["message"]
    assert env.get("job", "has.dot") is None and env.get("configmap", "has.dot-config") is None
    assert "InvalidSpec" in env.event_reasons("has.dot")


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_operator_metrics(env: Env):
    env.apply(ftj("metered"))
    env.wait_running("metered")
    env.evict(env.pods("metered")[0])
    wait_for(lambda: env.status("metered").get("restarts") == 1, 30, what="disruption counted")
    wait_metrics_up(env)
    s = _samples(env.metrics())
    kind = ("kind", "FineTuneJob")
    assert s[("kubeforge_restarts_total", (kind, ("reason", "Disruption")))] >= 1
    assert s[("kubeforge_reconcile_duration_seconds_count", (kind,))] >= 1
    assert s[("kubeforge_time_to_workers_running_seconds_count", (kind,))] >= 1
    phases = {dict(labels)["phase"]: v for (n, labels), v in s.items() if n == "kubeforge_jobs" and kind in labels}
    assert phases.get("Running", 0) + phases.get("Restarting", 0) >= 1, phases


def test_progress_is_read_from_the_rank0_metrics_endpoint_and_survives_its_loss(env: Env):
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    env.apply(ftj("progress"))
    env.wait_running("progress")
    pod_ip = env.pods("progress")[0]["status"]["podIP"]
    # kwok's pod IPs are delivered on this machine (tests/support/cluster.py): nothing leaves it.
    assert ipaddress.ip_address(pod_ip) in ipaddress.ip_network(env.cluster.pod_cidr), (pod_ip, env.cluster.pod_cidr)
    # 198.18.0.0/15 wherever this machine routes it locally, else the loopback fallback.
    assert env.cluster.pod_cidr == (POD_RANGE if pod_range_is_local(POD_RANGE) else LOOPBACK_POD_RANGE)
    # Play rank 0: serve the trainer's gauges on the pod's own IP and the contract's port.
    reg = CollectorRegistry()
    g = {name: Gauge(name, name, registry=reg) for name in (
        contract.METRIC_STEP, contract.METRIC_TOTAL_STEPS, contract.METRIC_EPOCH, contract.METRIC_LOSS,
        contract.METRIC_TOKENS_PER_SECOND, contract.METRIC_LAST_CHECKPOINT_STEP)}
    for name, value in ((contract.METRIC_STEP, 40), (contract.METRIC_TOTAL_STEPS, 100), (contract.METRIC_EPOCH, 0.4),
                        (contract.METRIC_LOSS, 2.5), (contract.METRIC_TOKENS_PER_SECOND, 4096),
                        (contract.METRIC_LAST_CHECKPOINT_STEP, 30)):
        g[name].set(value)
    # The trainer names its job (from the env the operator sets); the operator reads no other endpoint.
    Gauge(contract.METRIC_JOB, "job", ["namespace", "name"], registry=reg).labels(
        namespace=env.namespace, name="progress").set(1)
    try:
        server, _thread = start_http_server(contract.DEFAULT_METRICS_PORT, addr=pod_ip, registry=reg)
    except OSError as exc:  # someone else on this machine holds the port on every address
        pytest.skip(f"cannot serve on {pod_ip}:{contract.DEFAULT_METRICS_PORT}: {exc}")
    try:
        st = wait_for(lambda: (s := env.status("progress")).get("progress", {}).get("step") == 40 and s, 30,
                      what="progress from the metrics endpoint")
        assert st["progress"] == {"step": 40, "totalSteps": 100, "epoch": 0.4, "loss": 2.5, "tokensPerSecond": 4096.0,
                                  "etaSeconds": 60, "percent": "40%"}
        assert st["lastCheckpoint"] == "s3://models/progress/checkpoints/step-00000030"
        g[contract.METRIC_STEP].set(50)
        wait_for(lambda: env.status("progress").get("progress", {}).get("step") == 50, 30, what="progress update")
    finally:
        server.shutdown()
        server.server_close()
    # The endpoint is gone: the job stays Running and keeps the last progress it showed.
    import time

    time.sleep(2)
    st = env.status("progress")
    assert st["phase"] == "Running" and st["progress"]["step"] == 50 and st["progress"]["percent"] == "50%"


def test_a_nan_loss_from_rank0_does_not_keep_the_job_from_succeeding(env: Env):
    """The API server refuses NaN in a status (400); a diverged trainer's NaN loss used to make
    every status write fail, so the job never reached Succeeded. The value is dropped instead."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    env.apply(ftj("diverged"))
    env.wait_running("diverged")
    pod_ip = env.pods("diverged")[0]["status"]["podIP"]
    reg = CollectorRegistry()
    Gauge(contract.METRIC_STEP, "step", registry=reg).set(40)
    Gauge(contract.METRIC_TOTAL_STEPS, "total", registry=reg).set(100)
    Gauge(contract.METRIC_LOSS, "loss", registry=reg).set(float("nan"))
    Gauge(contract.METRIC_JOB, "job", ["namespace", "name"], registry=reg).labels(
        namespace=env.namespace, name="diverged").set(1)  # the trainer names its job
    try:
        server, _thread = start_http_server(contract.DEFAULT_METRICS_PORT, addr=pod_ip, registry=reg)
    except OSError as exc:  # someone else on this machine holds the port on every address
        pytest.skip(f"cannot serve on {pod_ip}:{contract.DEFAULT_METRICS_PORT}: {exc}")
    try:
        st = wait_for(lambda: (s := env.status("diverged")).get("progress", {}).get("step") == 40 and s, 30,
                      what="progress without the NaN loss")
        assert "loss" not in st["progress"]
        for pod in env.pods("diverged"):
            env.exit_pod(pod, 0)
        st = env.wait_phase("diverged", "Succeeded", 60)
        assert st["progress"]["step"] == 100 and "loss" not in st["progress"]
    finally:
        server.shutdown()
        server.server_close()
