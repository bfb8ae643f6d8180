"""FineTuneJob status (pure): phases, conditions, restarts counted once, terminal stays terminal;
progress from a real Prometheus endpoint serving the trainer's metric names."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from kubeforge.api.finetune import FineTuneJobSpec
from kubeforge.controllers import finetune_status as fs
from kubeforge.controllers import scrape
from kubeforge_runtime import contract

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z"


def spec(**over) -> FineTuneJobSpec:
    base = {"model": {"uri": "hf://a/b"}, "dataset": {"uri": "s3://d/t.jsonl"}, "output": {"uri": "s3://m/out"},
            "nodes": {"min": 2, "max": 2}}
    base.update(over)
    return FineTuneJobSpec.model_validate(base)


def job(*conds: tuple[str, str], suspend: bool = False) -> dict:
    return {"metadata": {"name": "ft", "uid": "job-uid"}, "spec": {"suspend": suspend},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": f"{r} message"}
                                      for t, r in conds]}}


def pod(index: int, phase: str = "Running", ready: bool = True, uid: str | None = None, created: str = T0,
        exit_code: int | None = None, message: str = "", disrupted: bool = False, deleting: bool = False) -> dict:
    conds = [{"type": "Ready", "status": "True" if ready and phase == "Running" else "False"}]
    if disrupted:
        conds.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"})
    st: dict = {"phase": phase, "conditions": conds, "podIP": f"127.16.0.{index + 2}"}
    if exit_code is not None:
        st["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "message": message}}}]
    meta = {"name": f"ft-{index}-{uid or index}", "uid": uid or f"uid-{index}", "creationTimestamp": created,
            "annotations": {fs.COMPLETION_INDEX_ANNOTATION: str(index)}}
    if deleting:
        meta["deletionTimestamp"] = T1
    return {"metadata": meta, "status": st}


def run(prev=None, j=None, pods=(), counted=(), s=None, progress=None, now=T1, gen=1, gate=None):
    obj = {"metadata": {"name": "ft", "namespace": "ns", "generation": gen}, "status": prev or {}}
    return fs.compute(obj, spec=s or spec(), job=j, pods=list(pods), counted=list(counted), progress=progress, now=now,
                      gate=gate)


def cond(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_no_job_yet_is_pending_and_not_created():
    out = run()
    assert out.status["phase"] == "Pending"
    assert cond(out.status, "Accepted")["status"] == "True"
    assert [e.reason for e in out.events] == ["Accepted"]  # no Pending event: a new job starts Pending
    assert cond(out.status, "Created")["status"] == "False"
    assert out.status["observedGeneration"] == 1


def test_workers_ready_is_running_once_with_start_time_and_events():
    out = run(j=job(), pods=[pod(0), pod(1)])
    st = out.status
    assert st["phase"] == "Running" and st["startTime"] == T1 and out.became_running_first_time
    assert st["workers"] == {"ready": 2, "total": 2, "min": 2, "max": 2}
    assert cond(st, "Created")["status"] == cond(st, "Running")["status"] == "True"
    # One Event for the new job (its acceptance and its children); the first start is in the
    # status (phase, Running condition, startTime), not in an Event.
    assert [(e.reason, e.message) for e in out.events] == [
        ("Accepted", "generation 1 accepted; created Service ft, ConfigMap ft-config and Job ft")]
    # The same observation again changes nothing and posts nothing.
    again = run(prev=st, j=job(), pods=[pod(0), pod(1)], now=T2)
    assert again.status == st and again.events == [] and not again.became_running_first_time


def test_partially_ready_is_pending():
    out = run(j=job(), pods=[pod(0), pod(1, phase="Pending", ready=False)])
    assert out.status["phase"] == "Pending" and out.status["workers"]["ready"] == 1
    assert cond(out.status, "Running")["reason"] == "WaitingForWorkers"


def test_unschedulable_workers_say_why():
    stuck = pod(1, phase="Pending", ready=False)
    stuck["status"]["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                          "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."})
    out = run(j=job(), pods=[pod(0), stuck])
    c = cond(out.status, "Running")
    assert out.status["phase"] == "Pending" and c["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in c["message"]


def test_elastic_runs_with_min_workers_while_others_wait():
    s = spec(nodes={"min": 1, "max": 3})
    out = run(s=s, j=job(), pods=[pod(0), pod(1, phase="Pending", ready=False)])
    assert out.status["phase"] == "Running" and out.status["workers"] == {"ready": 1, "total": 2, "min": 1, "max": 3}


def test_worker_failure_restarts_counts_once_then_recovers():
    running = run(j=job(), pods=[pod(0), pod(1)]).status
    failed = pod(0, phase="Failed", exit_code=1, message="NCCL error", uid="a")
    out = run(prev=running, j=job(), pods=[failed, pod(1)], now=T2)
    st = out.status
    assert st["phase"] == "Restarting" and st["restarts"] == 1 and out.counted == ["a"]
    assert out.new_restarts == ["Failure"]
    assert cond(st, "Restarting")["reason"] == "WorkerFailed" and "exited with code 1: NCCL error" in cond(st, "Restarting")["message"]
    assert {"WorkerFailed", "Restarting"} <= {e.reason for e in out.events}
    # Seen again (another event, an operator restart): not counted twice.
    again = run(prev=st, j=job(), pods=[failed, pod(1)], counted=out.counted, now=T2)
    assert again.status["restarts"] == 1 and again.new_restarts == [] and again.status["phase"] == "Restarting"
    # Replacement pending, then ready: Running again, Restarting condition False.
    repl = pod(0, phase="Pending", ready=False, uid="b", created=T1)
    assert run(prev=st, j=job(), pods=[failed, repl, pod(1)], counted=out.counted).status["phase"] == "Restarting"
    back = run(prev=st, j=job(), pods=[failed, pod(0, uid="b", created=T1), pod(1)], counted=out.counted, now=T2)
    assert back.status["phase"] == "Running" and back.status["restarts"] == 1
    assert cond(back.status, "Restarting")["status"] == "False" and cond(back.status, "Restarting")["reason"] == "Recovered"
    assert back.status["startTime"] == T1  # not reset by a restart


def test_disruption_is_a_restart_with_its_own_reason():
    running = run(j=job(), pods=[pod(0), pod(1)]).status
    evicted = pod(1, phase="Failed", exit_code=143, disrupted=True, deleting=True, uid="e")
    out = run(prev=running, j=job(), pods=[pod(0), evicted], now=T2)
    assert out.status["restarts"] == 1 and out.new_restarts == ["Disruption"]
    assert cond(out.status, "Restarting")["reason"] == "WorkerDisrupted"
    assert "not counted against backoffLimit" in cond(out.status, "Restarting")["message"]


def test_pods_deleted_by_the_job_controller_are_not_restarts():
    running = run(j=job(), pods=[pod(0), pod(1)]).status
    stopped = [pod(0, phase="Failed", exit_code=143, deleting=True), pod(1, phase="Failed", exit_code=143, deleting=True)]
    out = run(prev=running, j=job(suspend=True), pods=stopped, s=spec(suspend=True), now=T2)
    assert out.status["phase"] == "Suspended" and not out.status.get("restarts") and out.new_restarts == []
    assert cond(out.status, "Suspended")["status"] == "True"
    resumed = run(prev=out.status, j=job(), pods=[pod(0, uid="n0"), pod(1, uid="n1")], now=T2)
    assert resumed.status["phase"] == "Running" and cond(resumed.status, "Suspended")["reason"] == "Resumed"


def test_job_suspended_by_a_queue_is_pending_queued():
    out = run(j=job(suspend=True), pods=[])
    assert out.status["phase"] == "Pending" and cond(out.status, "Running")["reason"] == "Queued"


def test_config_error_exit_code_fails_at_once_with_the_trainers_message():
    running = run(j=job(), pods=[pod(0), pod(1)]).status
    bad = pod(1, phase="Failed", exit_code=contract.EXIT_CONFIG_ERROR, message="dataset.format: bad")
    out = run(prev=running, j=job(), pods=[pod(0), bad], now=T2)
    st = out.status
    assert st["phase"] == "Failed" and st["completionTime"] == T2 and not st.get("restarts")
    c = cond(st, "Failed")
    assert c["reason"] == "ConfigurationError" and "exited with code 78" in c["message"] and "dataset.format: bad" in c["message"]
    assert [e.reason for e in out.events] == ["ConfigurationError"] and out.events[0].type == "Warning"


def _crossed_report(tmp_path) -> str:
    """What the preflight writes when a red line is crossed, from the runtime's own code on a real file."""
    from kubeforge_runtime import datacheck

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "a "}\n{"text": "b"}\n{"text": "c"}\n')
    report = datacheck.check_file(path, "text", {"maxDuplicateShare": 0.2, "minRecords": 2})
    assert not report.passed
    return report.termination_report()


def test_data_quality_report_fails_with_data_quality_failed_and_the_measurements_in_status(tmp_path):
    running = run(j=job(), pods=[pod(0), pod(1)]).status
    bad = pod(0, phase="Failed", exit_code=contract.EXIT_CONFIG_ERROR, message=_crossed_report(tmp_path))
    out = run(prev=running, j=job(), pods=[bad, pod(1)], now=T2)
    st = out.status
    assert st["phase"] == "Failed" and st["completionTime"] == T2 and not st.get("restarts")
    c = cond(st, "Failed")
    assert c["reason"] == "DataQualityFailed" and "exited with code 78 before training" in c["message"]
    assert "maxDuplicateShare: duplicateShare 0.25 is above the threshold 0.2" in c["message"]
    dq = st["result"]["dataQuality"]
    assert dq["passed"] is False and dq["thresholds"] == {"maxDuplicateShare": 0.2, "minRecords": 2}
    assert dq["measurements"] == {"records": 4, "unparseableRecords": 0, "unparseableShare": 0.0,
                                  "duplicateRecords": 1, "exactDuplicateRecords": 0, "duplicateShare": 0.25}
    assert dq["violations"] == ["maxDuplicateShare: duplicateShare 0.25 is above the threshold 0.2"]
    assert [e.reason for e in out.events] == ["DataQualityFailed"]
    # The status validates against the API's status model (what the CRD's schema says).
    from kubeforge.api.finetune import FineTuneJobStatus

    FineTuneJobStatus.model_validate(st)
    # The same exit code with a plain message stays a ConfigurationError; a report with
    # another exit code is not a data-quality failure.
    plain = pod(0, phase="Failed", exit_code=contract.EXIT_CONFIG_ERROR, message="configuration error: x")
    assert cond(run(prev=running, j=job(), pods=[plain]).status, "Failed")["reason"] == "ConfigurationError"
    assert fs.data_quality_report(pod(0, phase="Failed", exit_code=1, message=_crossed_report(tmp_path))) is None


def test_success_copies_the_passing_data_measurements(tmp_path):
    result = ('{"kind":"FineTuneJobResult","steps":3,"dataQuality":{"passed":true,"measurements":{"records":4,'
              '"duplicateShare":0.0,"labelImbalance":1.5},"thresholds":{"maxLabelImbalance":2},"violations":[]}}')
    st = run(j=job(("Complete", "CompletionsReached")),
             pods=[pod(0, phase="Succeeded", exit_code=0, message=result)]).status
    assert st["result"]["dataQuality"] == {"passed": True, "measurements": {"records": 4, "duplicateShare": 0.0,
                                                                            "labelImbalance": 1.5},
                                           "thresholds": {"maxLabelImbalance": 2}, "violations": []}


@pytest.mark.parametrize("job_reason, expected, text", [
    ("BackoffLimitExceeded", "BackoffLimitExceeded", "backoffLimit"),
    ("DeadlineExceeded", "DeadlineExceeded", "activeDeadlineSeconds"),
    ("PodFailurePolicy", "PodFailurePolicy", "PodFailurePolicy message"),
])
def test_job_failure_reasons(job_reason, expected, text):
    running = run(j=job(), pods=[pod(0), pod(1)]).status
    out = run(prev=running, j=job(("Failed", job_reason)), pods=[], now=T2)
    assert out.status["phase"] == "Failed" and cond(out.status, "Failed")["reason"] == expected
    assert text in cond(out.status, "Failed")["message"] and cond(out.status, "Running")["status"] == "False"


def test_failure_target_is_enough_to_fail():
    out = run(j=job(("FailureTarget", "DeadlineExceeded")), pods=[pod(0), pod(1)])
    assert out.status["phase"] == "Failed"


def test_success_sets_output_completion_time_and_full_progress():
    running = run(j=job(), pods=[pod(0), pod(1)], progress={"step": 90, "totalSteps": 100}).status
    assert running["progress"]["percent"] == "90%"
    out = run(prev=running, j=job(("Complete", "CompletionsReached")), pods=[], now=T2)
    st = out.status
    assert st["phase"] == "Succeeded" and st["completionTime"] == T2 and st["output"] == {"uri": "s3://m/out"}
    assert st["progress"]["step"] == 100 and st["progress"]["percent"] == "100%"
    assert cond(st, "Succeeded")["reason"] == "Completed"
    assert "Succeeded" in [e.reason for e in out.events]
    assert run(prev=running, j=job(("SuccessCriteriaMet", "SuccessPolicy")), pods=[]).status["phase"] == "Succeeded"
    # A later sync with the poller's last scrape (taken before the end) keeps the final step.
    again = run(prev=st, j=job(("Complete", "CompletionsReached")), pods=[], progress={"step": 90, "totalSteps": 100})
    assert again.status == st


def test_success_copies_the_trainers_result_from_the_termination_message():
    result = ('{"kind":"FineTuneJobResult","steps":30,"finalLoss":0.12,"initialValidationLoss":NaN,'
              '"evaluation":{"metric":"accuracy","before":0.51,"after":0.96,"samples":200},"unknown":1}')
    pods = [pod(0, phase="Succeeded", exit_code=0, message=result),
            pod(1, phase="Succeeded", exit_code=0, message="")]
    st = run(j=job(("Complete", "CompletionsReached")), pods=pods).status
    # Non-finite numbers become null (the API server refuses NaN); unknown keys are dropped.
    assert st["result"] == {"steps": 30, "finalLoss": 0.12, "initialValidationLoss": None,
                            "evaluation": {"metric": "accuracy", "before": 0.51, "after": 0.96, "samples": 200}}
    # A message that is not the trainer's result (a config error, the log tail) is not a result.
    other = run(j=job(("Complete", "CompletionsReached")), pods=[pod(0, phase="Succeeded", exit_code=0,
                                                                         message="configuration error: x")]).status
    assert "result" not in other


@pytest.mark.parametrize("terminal", ["Succeeded", "Failed"])
def test_terminal_is_never_left(terminal):
    prev = {"phase": terminal, "completionTime": T1, "conditions": [], "observedGeneration": 1}
    # Whatever the cluster shows now (a running Job, ready pods), the phase stays.
    out = run(prev=prev, j=job(), pods=[pod(0), pod(1)], gen=2, now=T2)
    assert out.status["phase"] == terminal and out.status["completionTime"] == T1
    assert out.status["observedGeneration"] == 2 and out.events == []


def test_counted_uids_are_bounded():
    running = run(j=job(), pods=[pod(0), pod(1)]).status
    old = [f"old-{i}" for i in range(fs.MAX_COUNTED_UIDS)]
    out = run(prev=running, j=job(), pods=[pod(0, phase="Failed", exit_code=1, uid="new"), pod(1)], counted=old)
    assert len(out.counted) == fs.MAX_COUNTED_UIDS and out.counted[-1] == "new"


def test_progress_and_last_checkpoint_from_metrics():
    s = spec(training={"globalBatchSize": 8}, dataset={"uri": "s3://d/t.jsonl", "sequenceLength": 512})
    samples = {contract.METRIC_STEP: 40, contract.METRIC_TOTAL_STEPS: 100, contract.METRIC_EPOCH: 0.4,
               contract.METRIC_LOSS: 2.345678, contract.METRIC_TOKENS_PER_SECOND: 4096.0,
               contract.METRIC_LAST_CHECKPOINT_STEP: 30}
    progress = fs.progress_from_metrics(samples, s)
    # 60 steps left x 4096 tokens per step / 4096 tokens/s = 60 s
    assert progress == {"step": 40, "totalSteps": 100, "epoch": 0.4, "loss": 2.34568, "tokensPerSecond": 4096.0,
                        "etaSeconds": 60, "lastCheckpointStep": 30}
    st = run(j=job(), pods=[pod(0), pod(1)], s=s, progress=progress).status
    assert st["progress"]["percent"] == "40%" and "lastCheckpointStep" not in st["progress"]
    assert st["lastCheckpoint"] == "s3://m/out/checkpoints/step-00000030"
    assert fs.progress_from_metrics({}, s) is None


def test_ttl_due():
    assert fs.ttl_due({"phase": "Succeeded", "completionTime": T1}, 60).isoformat() == "2026-01-01T00:02:00+00:00"
    assert fs.ttl_due({"phase": "Running"}, 60) is None
    assert fs.ttl_due({"phase": "Failed", "completionTime": T1}, None) is None


# --- the table: what one sync reads -> phase, conditions, events ----------------------------------
ACCEPTED = {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "spec is valid",
            "lastTransitionTime": T0, "observedGeneration": 1}
CREATED = {"type": "Created", "status": "True", "reason": "ChildrenCreated", "message": "Service ft, ConfigMap ft-config, Job ft",
           "lastTransitionTime": T0, "observedGeneration": 1}

TABLE = [
    # id, previous phase (None: new), Job, pods, spec overrides -> phase, Running (status, reason), events
    ("new, no Job yet", None, None, [], {},
     "Pending", ("False", "Pending"), ["Accepted"]),
    ("Job created, workers pending", "Pending", job(), [pod(0, "Pending", ready=False)], {},
     "Pending", ("False", "WaitingForWorkers"), []),
    ("queued by Kueue", "Pending", job(suspend=True), [], {},
     "Pending", ("False", "Queued"), []),
    ("all workers ready", "Pending", job(), [pod(0), pod(1)], {},
     "Running", ("True", "WorkersReady"), []),
    ("ready again after a restart", "Restarting", job(), [pod(0), pod(1)], {},
     "Running", ("True", "WorkersReady"), ["Running"]),
    ("resumed", "Suspended", job(), [pod(0), pod(1)], {},
     "Running", ("True", "WorkersReady"), ["Running"]),
    ("suspended", "Running", job(suspend=True), [], {"suspend": True},
     "Suspended", ("False", "Suspended"), ["Suspended"]),
    ("a worker failed", "Running", job(), [pod(0, "Failed", exit_code=1, uid="x"), pod(1)], {},
     "Restarting", ("False", "Restarting"), ["WorkerFailed", "Restarting"]),
    ("Job complete", "Running", job(("Complete", "CompletionsReached")), [], {},
     "Succeeded", ("False", "Completed"), ["Succeeded"]),
    ("Job failed", "Running", job(("Failed", "BackoffLimitExceeded")), [], {},
     "Failed", ("False", "BackoffLimitExceeded"), ["BackoffLimitExceeded"]),
]


@pytest.mark.parametrize("prev_phase, j, pods, over, phase, running, events",
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_status_table(prev_phase, j, pods, over, phase, running, events):
    prev = {"phase": prev_phase, "conditions": [ACCEPTED, CREATED], "observedGeneration": 1} if prev_phase else {}
    if prev_phase in ("Running", "Restarting", "Suspended"):
        prev["startTime"] = T0  # it has run before: a return to Running is an Event
    out = run(prev=prev, j=j, pods=pods, s=spec(**over))
    assert out.status["phase"] == phase
    assert (cond(out.status, "Running")["status"], cond(out.status, "Running")["reason"]) == running
    assert [e.reason for e in out.events] == events
    # Nothing new seen (the failures counted): the same status, no event (a sync writes nothing).
    again = run(prev=out.status, j=j, pods=pods, s=spec(**over), counted=out.counted, now=T2)
    assert again.status == out.status and again.events == []


# --- scraping a real endpoint ---------------------------------------------------------------------------

def test_scrape_reads_the_trainers_gauges_over_http():
    reg = CollectorRegistry()
    Gauge(contract.METRIC_STEP, "step", registry=reg).set(7)
    Gauge(contract.METRIC_LOSS, "loss", registry=reg).set(1.5)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=reg)
    try:
        samples = scrape.fetch(f"http://127.0.0.1:{server.server_address[1]}/metrics")
        assert samples == {contract.METRIC_STEP: 7.0, contract.METRIC_LOSS: 1.5}
    finally:
        server.shutdown()
        server.server_close()


def test_scrape_of_an_unreachable_endpoint_is_none_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        assert scrape.fetch(f"http://127.0.0.1:{port}/metrics", timeout=0.5) is None
    # 192.0.2.0/24 is TEST-NET-1: never routed; the timeout bounds the wait.
    assert scrape.fetch("http://192.0.2.1:9090/metrics", timeout=0.2) is None


def test_scrape_of_something_that_is_not_prometheus_text_is_none():
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>{{{ not metrics")

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert scrape.fetch(f"http://127.0.0.1:{srv.server_address[1]}/metrics") is None
    finally:
        srv.shutdown()
        srv.server_close()


# --- the data gate (spec.dataset.checks) -------------------------------------------------------------

CHECKS = {"maxDuplicateShare": 0.2, "minRecords": 2}


def gate_job(*conds: tuple[str, str]) -> dict:
    return {"metadata": {"name": "ft-datacheck", "uid": "gate-uid"}, "spec": {},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": f"{r} message"}
                                      for t, r in conds]}}


def gate_pod(phase: str = "Running", exit_code: int | None = None, message: str = "", created: str = T0,
             name: str = "ft-datacheck-abcde", unschedulable: str | None = None) -> dict:
    st: dict = {"phase": phase, "conditions": []}
    if unschedulable:
        st["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": unschedulable})
    if exit_code is not None:
        st["containerStatuses"] = [{"name": "datacheck", "state": {"terminated": {"exitCode": exit_code,
                                                                                  "message": message}}}]
    return {"metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created}, "status": st}


def _report(tmp_path, lines: list[str], checks: dict) -> str:
    """The termination message of the gate pod, from the runtime's own check on a real file."""
    from kubeforge_runtime import datacheck

    path = tmp_path / "g.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return datacheck.check_file(path, "text", checks).termination_report()


def _passing(tmp_path) -> str:
    return _report(tmp_path, ['{"text": "a"}', '{"text": "b"}', '{"text": "c"}'], CHECKS)


def _crossed(tmp_path) -> str:
    return _report(tmp_path, ['{"text": "a"}', '{"text": "a "}', '{"text": "b"}', '{"text": "c"}'], CHECKS)


@pytest.mark.parametrize("gj, pods, state, words", [
    (None, [], "Pending", "creating the data check Job"),
    ("job", [], "Running", "before creating workers"),
    ("job", [gate_pod(phase="Pending", unschedulable="0/3 nodes are available: Insufficient cpu")], "Running",
     "not schedulable: 0/3 nodes are available: Insufficient cpu"),
    ("job", ["passed"], "Passed", "data checks passed (Job ft-datacheck): records 3"),
    ("job", ["crossed"], "DataQualityFailed",
     "maxDuplicateShare: duplicateShare 0.25 is above the threshold 0.2"),
    ("job", [gate_pod("Failed", 78, "configuration error: dataset 's3://d/t.jsonl': no such key")],
     "ConfigurationError", "exited with code 78: configuration error: dataset 's3://d/t.jsonl': no such key"),
    ("failed", [gate_pod("Failed", 1, "boto: connection reset", T0, "a"),
                gate_pod("Failed", 137, "", T1, "b")],
     "DataCheckFailed", "(BackoffLimitExceeded: BackoffLimitExceeded message); last: data check pod b exited with code 137"),
    ("complete", [gate_pod("Succeeded", 0, "")], "DataCheckFailed", "without a DataQualityReport"),
])
def test_gate_state_table(tmp_path, gj, pods, state, words):
    the_job = {None: None, "job": gate_job(), "failed": gate_job(("Failed", "BackoffLimitExceeded")),
               "complete": gate_job(("Complete", "CompletionsReached"))}[gj]
    pods = [gate_pod("Succeeded", 0, _passing(tmp_path)) if p == "passed" else
            gate_pod("Failed", 78, _crossed(tmp_path)) if p == "crossed" else p for p in pods]
    gate = fs.gate_state(the_job, pods)
    assert gate.state == state and words in gate.message, gate
    assert gate.passed == (state == "Passed")
    assert gate.failed == (state not in ("Pending", "Running", "Passed"))


def test_a_passing_gate_report_with_exit_1_or_a_worker_container_is_not_a_pass(tmp_path):
    assert fs.gate_state(gate_job(), [gate_pod("Failed", 1, _passing(tmp_path))]).state == "Running"
    worker = pod(0, phase="Succeeded", exit_code=0, message=_passing(tmp_path))
    assert fs.gate_state(gate_job(), [worker]).state == "Running"


def gated_spec(**over) -> FineTuneJobSpec:
    return spec(dataset={"uri": "s3://d/t.jsonl", "checks": CHECKS}, **over)


def test_while_the_gate_runs_the_job_is_pending_with_data_checked_unknown():
    out = run(s=gated_spec(), gate=fs.gate_state(gate_job(), [gate_pod()]))
    st = out.status
    assert st["phase"] == "Pending"
    assert cond(st, "DataChecked")["status"] == "Unknown" and cond(st, "DataChecked")["reason"] == "DataCheckRunning"
    assert cond(st, "Created")["status"] == "False" and cond(st, "Created")["reason"] == "WaitingForDataCheck"
    assert cond(st, "Running")["reason"] == "DataCheckRunning"
    assert [(e.reason, e.message) for e in out.events] == [
        ("Accepted", "generation 1 accepted"), ("Pending", "checking the data red lines before creating workers")]
    again = run(prev=st, s=gated_spec(), gate=fs.gate_state(gate_job(), [gate_pod()]), now=T2)
    assert again.status == st and again.events == []


def test_a_passing_gate_records_the_measurements_and_the_workers_status_follows(tmp_path):
    waiting = run(s=gated_spec(), gate=fs.gate_state(gate_job(), [gate_pod()])).status
    gate = fs.gate_state(gate_job(), [gate_pod("Succeeded", 0, _passing(tmp_path))])
    # The same sync creates the workers (the controller), so their Job is already there.
    out = run(prev=waiting, s=gated_spec(), j=job(), pods=[pod(0, phase="Pending", ready=False)], gate=gate, now=T2)
    st = out.status
    assert st["phase"] == "Pending" and cond(st, "Running")["reason"] == "WaitingForWorkers"
    dc = cond(st, "DataChecked")
    assert dc["status"] == "True" and dc["reason"] == "DataCheckPassed" and "duplicateShare 0.0" in dc["message"]
    assert cond(st, "Created")["status"] == "True"
    dq = st["result"]["dataQuality"]
    assert dq["passed"] is True and dq["violations"] == [] and dq["thresholds"] == CHECKS
    assert dq["measurements"]["records"] == 3 and dq["measurements"]["duplicateShare"] == 0.0
    assert [e.reason for e in out.events] == ["DataCheckPassed", "Created"]
    from kubeforge.api.finetune import FineTuneJobStatus

    FineTuneJobStatus.model_validate(st)
    # Later syncs no longer look at the gate; the measurements and the condition stay.
    later = run(prev=st, s=gated_spec(), j=job(), pods=[pod(0), pod(1)], now=T2)
    assert later.status["phase"] == "Running" and later.status["result"] == st["result"]
    assert cond(later.status, "DataChecked") == dc
    # The trainer's result keeps the gate's measurements unless it reports its own.
    done = run(prev=later.status, s=gated_spec(), j=job(("Complete", "CompletionsReached")),
               pods=[pod(0, phase="Succeeded", exit_code=0, message='{"kind":"FineTuneJobResult","steps":3}')], now=T2)
    assert done.status["result"] == {"dataQuality": dq, "steps": 3}


def test_a_crossed_line_fails_the_job_before_any_worker(tmp_path):
    waiting = run(s=gated_spec(), gate=fs.gate_state(gate_job(), [gate_pod()])).status
    gate = fs.gate_state(gate_job(("FailureTarget", "PodFailurePolicy")), [gate_pod("Failed", 78, _crossed(tmp_path))])
    out = run(prev=waiting, s=gated_spec(), gate=gate, now=T2)
    st = out.status
    assert st["phase"] == "Failed" and st["completionTime"] == T2
    failed = cond(st, "Failed")
    assert failed["reason"] == "DataQualityFailed" and "before any worker was created" in failed["message"]
    assert "duplicateShare 0.25 is above the threshold 0.2" in failed["message"]
    assert cond(st, "DataChecked")["status"] == "False" and cond(st, "DataChecked")["reason"] == "DataQualityFailed"
    assert cond(st, "Created")["status"] == "False"
    dq = st["result"]["dataQuality"]
    assert dq["passed"] is False and dq["measurements"]["duplicateShare"] == 0.25 and dq["thresholds"] == CHECKS
    assert [e.reason for e in out.events] == ["DataQualityFailed"] and out.events[0].type == "Warning"
    # Terminal: the gate is not looked at again, nothing changes.
    again = run(prev=st, s=gated_spec(), gate=fs.gate_state(gate_job(), []), now=T2)
    assert again.status == st and again.events == []


@pytest.mark.parametrize("gate_pods, gj, reason", [
    ([gate_pod("Failed", 78, "configuration error: dataset: not a file")], (), "ConfigurationError"),
    ([gate_pod("Failed", 1, "boom")], (("Failed", "BackoffLimitExceeded"),), "DataCheckFailed"),
])
def test_a_gate_that_cannot_run_fails_the_job_with_a_clear_reason(gate_pods, gj, reason):
    out = run(s=gated_spec(), gate=fs.gate_state(gate_job(*gj), gate_pods))
    assert out.status["phase"] == "Failed" and cond(out.status, "Failed")["reason"] == reason
    assert "result" not in out.status and [e.reason for e in out.events] == ["Accepted", reason]


def test_a_suspended_gate_is_suspended_and_resumes_pending():
    out = run(s=gated_spec(suspend=True), gate=fs.gate_state(gate_job(), []))
    assert out.status["phase"] == "Suspended" and cond(out.status, "Suspended")["status"] == "True"
    resumed = run(prev=out.status, s=gated_spec(), gate=fs.gate_state(gate_job(), []), now=T2)
    assert resumed.status["phase"] == "Pending" and cond(resumed.status, "Suspended")["reason"] == "Resumed"


def test_without_checks_there_is_no_gate_condition():
    out = run(j=job(), pods=[pod(0), pod(1)])
    assert not any(c["type"] == "DataChecked" for c in out.status["conditions"])
