"""QuantizeJob status (``quantize_status``), report parsing and reference resolution (pure)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from kubeforge.api import spec_problem
from kubeforge.controllers import quantize_status as qc
from kubeforge.controllers.conditions import reject
from kubeforge.controllers.references import resolve, resolve_model, resolve_uri, revision_of

AT = "2026-01-01T00:00:00Z"
REPORT = {"originalBytes": 400, "quantizedBytes": 100, "compressionRatio": 4.0,
          "latencyMsPerToken": {"before": 10.0, "after": 4.0}, "perplexity": {"before": 20.0, "after": 20.1},
          "perplexityIncreasePercent": 0.5, "maxPerplexityIncreasePercent": 1.0, "gatePassed": True,
          "method": "int8-dynamic", "reason": "Succeeded", "message": "ok", "outputUri": "s3://b/q"}


def qj(model=None, status=None, generation=1, **spec):
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob",
            "metadata": {"name": "q", "namespace": "ns", "uid": "u1", "generation": generation},
            "spec": {"model": model or {"uri": "s3://b/base"}, "output": {"uri": "s3://b/q"}, **spec},
            "status": status or {}}


def ftj(phase, uri=None, uid="f1", conditions=None):
    st = {"phase": phase}
    if uri:
        st["output"] = {"uri": uri}
        st["completionTime"] = AT
    if conditions:
        st["conditions"] = conditions
    return {"metadata": {"name": "ft", "uid": uid}, "status": st}


def job(conditions=(), ready=0, active=0, suspend=False, start=AT):
    return {"metadata": {"name": "q-quantize", "uid": "j1", "ownerReferences": [{"uid": "u1"}],
                         "annotations": {"kubeforge.io/model-uri": "s3://b/base"}},
            "spec": {"suspend": suspend},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions],
                       "ready": ready, "active": active, "startTime": start}}


def pod(code, message=None, finished=AT):
    term = {"exitCode": code, "finishedAt": finished}
    if message is not None:
        term["message"] = message
    return {"status": {"containerStatuses": [{"name": "quantize", "state": {"terminated": term}}]}}


def cond(status, type_):
    return next((c for c in status["conditions"] if c["type"] == type_), None)


def decide(obj, reference, job, pods, at):
    """What one sync of ``obj`` concludes (as the reconciler does it): reject an invalid spec,
    else resolve the input (``reference`` is the FineTuneJob read) and compute the status."""
    try:
        spec = qc.validate(obj)
    except ValidationError as exc:
        return qc.QuantizeOutcome(**vars(reject(obj, spec_problem(exc), at)))
    resolution = resolve_model(spec.model, lambda kind, name: reference)
    return qc.compute(obj, spec=spec, resolution=resolution, job=job, pods=pods, now=at)


# --- input ------------------------------------------------------------------------------------
def test_uri_model_creates_the_job_at_once():
    d = decide(qj(), None, None, [], AT)
    assert d.create_with_model_uri == "s3://b/base"
    assert d.status["phase"] == "Pending" and d.status["modelUri"] == "s3://b/base"
    assert cond(d.status, "Accepted")["status"] == "True"
    assert {e.reason for e in d.events} == {"Accepted", "JobCreated"}


@pytest.mark.parametrize("ref", [None, ftj("Running")])
def test_reference_not_succeeded_waits(ref):
    d = decide(qj({"fineTuneJobRef": {"name": "ft"}}), ref, None, [], AT)
    assert d.create_with_model_uri is None
    assert d.status["phase"] == "WaitingForInput"
    c = cond(d.status, "InputReady")
    assert (c["status"], c["reason"]) == ("False", "WaitingForInput") and "FineTuneJob ft" in c["message"]
    assert "WaitingForInput" in {e.reason for e in d.events}


def test_reference_succeeded_uses_its_output():
    d = decide(qj({"fineTuneJobRef": {"name": "ft"}}, status={"phase": "WaitingForInput"}),
                  ftj("Succeeded", "pvc://m/ft"), None, [], AT)
    assert d.create_with_model_uri == "pvc://m/ft" and d.status["modelUri"] == "pvc://m/ft"
    assert cond(d.status, "InputReady")["status"] == "True"


def test_reference_failed_fails_with_input_failed():
    ref = ftj("Failed", conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                     "message": "workers failed"}])
    d = decide(qj({"fineTuneJobRef": {"name": "ft"}}), ref, None, [], AT)
    assert d.create_with_model_uri is None and d.status["phase"] == "Failed"
    c = cond(d.status, "Failed")
    assert c["reason"] == "InputFailed" and "BackoffLimitExceeded: workers failed" in c["message"]
    assert any(e.type == "Warning" and e.reason == "InputFailed" for e in d.events)


def test_reference_succeeded_without_output_is_an_input_failure():
    d = decide(qj({"fineTuneJobRef": {"name": "ft"}}), ftj("Succeeded"), None, [], AT)
    assert d.status["phase"] == "Failed" and "no status.output.uri" in cond(d.status, "Failed")["message"]


# --- spec ---------------------------------------------------------------------------------------
def test_invalid_spec_is_reported_once_and_nothing_starts():
    d = decide(qj(method="int3"), None, None, [], AT)
    assert d.create_with_model_uri is None
    c = cond(d.status, "Accepted")
    assert (c["status"], c["reason"]) == ("False", "InvalidSpec") and "method" in c["message"]
    assert [e.reason for e in d.events] == ["InvalidSpec"]
    again = decide(qj(method="int3", status=d.status), None, None, [], AT)
    assert again.events == [] and again.status == d.status


def test_group_size_the_runtime_cannot_use_is_rejected_up_front():
    from typing import get_args

    from kubeforge_runtime.quantize.config import GROUP_SIZES

    from kubeforge.api.quantize import QuantizeJobSpec

    # The API allows exactly the group sizes the runtime accepts (and the API server enforces it).
    assert get_args(QuantizeJobSpec.model_fields["group_size"].annotation) == GROUP_SIZES
    d = decide(qj(groupSize=48), None, None, [], AT)
    assert cond(d.status, "Accepted")["reason"] == "InvalidSpec"
    assert "groupSize" in cond(d.status, "Accepted")["message"]


# --- the Job ------------------------------------------------------------------------------------
def test_job_pending_then_running():
    d = decide(qj(status={"phase": "Pending"}), None, job(), [], AT)
    assert d.status["phase"] == "Pending" and cond(d.status, "Running")["reason"] == "PodStarting"
    d = decide(qj(status=d.status), None, job(ready=1, active=1), [], AT)
    assert d.status["phase"] == "Running" and d.status["startTime"] == AT
    assert [e.reason for e in d.events if e.reason == "Running"] == ["Running"]


def test_suspended_job_is_queued():
    d = decide(qj(), None, job(suspend=True), [], AT)
    assert d.status["phase"] == "Pending" and cond(d.status, "Running")["reason"] == "Queued"


def test_success_puts_the_report_into_result_and_output():
    j = job([("SuccessCriteriaMet", "", ""), ("Complete", "", "")])
    j["status"]["completionTime"] = "2026-01-01T01:00:00Z"
    d = decide(qj(status={"phase": "Running"}), None, j, [pod(0, json.dumps(REPORT))], AT)
    st = d.status
    assert st["phase"] == "Succeeded" and st["output"] == {"uri": "s3://b/q"}
    assert st["completionTime"] == "2026-01-01T01:00:00Z"
    assert st["result"] == {"method": "int8-dynamic", "originalBytes": 400, "quantizedBytes": 100,
                            "compressionRatio": 4.0, "latencyMsPerToken": {"before": 10.0, "after": 4.0},
                            "perplexity": {"before": 20.0, "after": 20.1}, "perplexityIncreasePercent": 0.5,
                            "gatePassed": True}
    assert "4x smaller" in cond(st, "Succeeded")["message"]
    assert cond(st, "Running")["status"] == "False"


def test_a_latency_note_reaches_the_result_and_the_succeeded_message():
    note = "int8-dynamic run eagerly on CPU ... expect it slower than the original"
    report = {**REPORT, "latencyPath": "continuous engine, cpu, eager (engine.compile: auto), batch 1",
              "latencyNote": note}
    j = job([("SuccessCriteriaMet", "", ""), ("Complete", "", "")])
    st = decide(qj(status={"phase": "Running"}), None, j, [pod(0, json.dumps(report))], AT).status
    assert st["result"]["latencyNote"] == note and st["result"]["latencyPath"].startswith("continuous engine, cpu")
    assert cond(st, "Succeeded")["message"].endswith(f"; {note}")


def test_success_without_a_report_still_succeeds():
    d = decide(qj(), None, job([("Complete", "", "")]), [pod(0, "some log line\n")], AT)
    assert d.status["phase"] == "Succeeded" and "result" not in d.status


def test_exit_79_is_quality_gate_failed_with_the_numbers():
    report = {**REPORT, "perplexity": {"before": 20.0, "after": 21.0}, "perplexityIncreasePercent": 5.0,
              "gatePassed": False}
    j = job([("FailureTarget", "PodFailurePolicy", "matched"), ("Failed", "PodFailurePolicy", "matched")])
    d = decide(qj(), None, j, [pod(79, json.dumps(report))], AT)
    c = cond(d.status, "Failed")
    assert d.status["phase"] == "Failed" and c["reason"] == "QualityGateFailed"
    assert "5%" in c["message"] and "20 -> 21" in c["message"] and "1% allowed" in c["message"]
    assert "kept but marked rejected" in c["message"]
    assert d.status["result"]["gatePassed"] is False and "output" not in d.status


def test_exit_78_is_configuration_error_with_the_runtime_message():
    report = {"reason": "UnsupportedMethod", "message": "int4 needs CUDA; use int8-weight-only", "gatePassed": False}
    d = decide(qj(), None, job([("Failed", "PodFailurePolicy", "")]), [pod(78, json.dumps(report))], AT)
    c = cond(d.status, "Failed")
    assert c["reason"] == "ConfigurationError" and "use int8-weight-only" in c["message"]


def test_exit_78_without_report_uses_the_log_tail():
    d = decide(qj(), None, job([("Failed", "PodFailurePolicy", "")]),
                  [pod(78, "Traceback...\nConfigError: unknown key 'foo'")], AT)
    assert "unknown key 'foo'" in cond(d.status, "Failed")["message"]


def test_other_failures_keep_the_job_reason_and_the_exit_code():
    j = job([("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")])
    d = decide(qj(), None, j, [pod(1, "OOM", "2026-01-01T00:00:01Z"), pod(137, "killed", "2026-01-01T00:00:09Z")], AT)
    c = cond(d.status, "Failed")
    assert c["reason"] == "BackoffLimitExceeded" and "last exit code 137" in c["message"] and "killed" in c["message"]


def test_exit_zero_with_a_failed_gate_is_not_a_success():
    d = decide(qj(), None, job([("Complete", "", "")]), [pod(0, json.dumps({**REPORT, "gatePassed": False}))], AT)
    assert d.status["phase"] == "Failed" and cond(d.status, "Failed")["reason"] == "QualityGateFailed"


def test_terminal_is_never_resurrected():
    for phase in ("Succeeded", "Failed"):
        st = {"phase": phase, "conditions": []}
        d = decide(qj(status=st), ftj("Succeeded", "s3://x"), None, [], AT)
        assert d.status == st and d.create_with_model_uri is None and d.events == []


def test_unchanged_outcome_gives_an_identical_status():
    first = decide(qj(), None, job(ready=1, active=1), [], AT).status
    second = decide(qj(status=first), None, job(ready=1, active=1), [], "2026-02-02T00:00:00Z")
    assert second.status == first and second.events == []


# --- report parsing -----------------------------------------------------------------------------
def test_parse_report_reads_json_or_the_last_json_line_of_a_log_tail():
    assert qc.parse_report(json.dumps({"a": 1})) == {"a": 1}
    assert qc.parse_report("loading...\nINFO done\n{\"gatePassed\": true}\n") == {"gatePassed": True}
    assert qc.parse_report("no json here") is None
    assert qc.parse_report(None) is None
    assert qc.parse_report("[1, 2]") is None


def test_result_from_report_ignores_unknown_keys_and_rejects_bad_types():
    assert qc.result_from_report({"reason": "x", "message": "y"}) is None
    assert qc.result_from_report({"compressionRatio": "lots"}) is None
    assert qc.result_from_report({"compressionRatio": 2, "outputUri": "s3://x"}) == {"compressionRatio": 2.0}


# --- references ---------------------------------------------------------------------------------
def test_revision_changes_with_a_new_job_or_a_new_uri():
    a = resolve("FineTuneJob", "ft", ftj("Succeeded", "s3://m/a", uid="1"))
    b = resolve("FineTuneJob", "ft", ftj("Succeeded", "s3://m/a", uid="2"))
    c = resolve("FineTuneJob", "ft", ftj("Succeeded", "s3://m/b", uid="1"))
    assert a.state == b.state == c.state == "ready"
    assert len({a.revision, b.revision, c.revision}) == 3
    assert a.revision == resolve("FineTuneJob", "ft", ftj("Succeeded", "s3://m/a", uid="1")).revision


def test_missing_reference_waits_and_uri_is_ready():
    assert resolve("QuantizeJob", "x", None).state == "missing"
    r = resolve_uri("hf://a/b")
    assert r.state == "ready" and r.revision == revision_of("hf://a/b")


# --- the table: what one sync reads -> phase, conditions, events, the Job to create ---------------
ACCEPTED = {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "spec is valid",
            "lastTransitionTime": AT, "observedGeneration": 1}
MISSING = resolve("FineTuneJob", "ft", None)
RUNNING_INPUT = resolve("FineTuneJob", "ft", ftj("Running"))
FAILED_INPUT = resolve("FineTuneJob", "ft", ftj("Failed"))
READY_INPUT = resolve_uri("s3://b/base")
GATE_FAILED = json.dumps({**REPORT, "gatePassed": False, "perplexityIncreasePercent": 5.0})

TABLE = [
    # id, previous phase (None: new), input, Job, pods -> phase, {condition: (status, reason)}, events, create
    ("new, input ready", None, READY_INPUT, None, [],
     "Pending", {"Accepted": ("True", "Accepted"), "InputReady": ("True", "InputReady"), "Running": ("False", "JobCreated")},
     ["Accepted", "JobCreated"], "s3://b/base"),
    ("new, input missing", None, MISSING, None, [],
     "WaitingForInput", {"InputReady": ("False", "WaitingForInput")}, ["Accepted", "WaitingForInput"], None),
    ("waiting, input still running", "WaitingForInput", RUNNING_INPUT, None, [],
     "WaitingForInput", {"InputReady": ("False", "WaitingForInput")}, [], None),
    ("waiting, input failed", "WaitingForInput", FAILED_INPUT, None, [],
     "Failed", {"InputReady": ("False", "InputFailed"), "Failed": ("True", "InputFailed"), "Running": ("False", "InputFailed")},
     ["InputFailed"], None),
    ("Job created, pod starting", "Pending", None, job(), [],
     "Pending", {"Running": ("False", "PodStarting")}, [], None),
    ("Job queued", "Pending", None, job(suspend=True), [],
     "Pending", {"Running": ("False", "Queued")}, [], None),
    ("pod ready", "Pending", None, job(ready=1, active=1), [],
     "Running", {"Running": ("True", "Running")}, ["Running"], None),
    ("Job complete with a report", "Running", None, job([("Complete", "", "")]), [pod(0, json.dumps(REPORT))],
     "Succeeded", {"Succeeded": ("True", "Succeeded"), "Running": ("False", "Completed")}, ["Succeeded"], None),
    ("Job complete, gate failed", "Running", None, job([("Complete", "", "")]), [pod(0, GATE_FAILED)],
     "Failed", {"Failed": ("True", "QualityGateFailed")}, ["QualityGateFailed"], None),
    ("exit 79", "Running", None, job([("Failed", "PodFailurePolicy", "")]), [pod(79, GATE_FAILED)],
     "Failed", {"Failed": ("True", "QualityGateFailed")}, ["QualityGateFailed"], None),
    ("exit 78", "Running", None, job([("Failed", "PodFailurePolicy", "")]), [pod(78, "bad key")],
     "Failed", {"Failed": ("True", "ConfigurationError")}, ["ConfigurationError"], None),
    ("backoff limit", "Running", None, job([("Failed", "BackoffLimitExceeded", "too many")]), [pod(1, "boom")],
     "Failed", {"Failed": ("True", "BackoffLimitExceeded"), "Running": ("False", "BackoffLimitExceeded")},
     ["BackoffLimitExceeded"], None),
    ("succeeded stays succeeded", "Succeeded", READY_INPUT, job(ready=1, active=1), [],
     "Succeeded", {}, [], None),
    ("failed stays failed", "Failed", READY_INPUT, None, [],
     "Failed", {}, [], None),
]


@pytest.mark.parametrize("prev_phase, resolution, j, pods, phase, conditions, events, create",
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_status_table(prev_phase, resolution, j, pods, phase, conditions, events, create):
    prev = {"phase": prev_phase, "conditions": [ACCEPTED], "observedGeneration": 1} if prev_phase else {}
    obj = qj(status=prev)
    out = qc.compute(obj, spec=qc.validate(obj), resolution=resolution, job=j, pods=pods, now=AT)
    assert out.status["phase"] == phase
    for type_, (status, reason) in conditions.items():
        assert (cond(out.status, type_)["status"], cond(out.status, type_)["reason"]) == (status, reason), type_
    assert [e.reason for e in out.events] == events
    assert out.create_with_model_uri == create
    if create is None:
        # Nothing new seen: the same status, no event (a sync writes nothing).
        again = qc.compute(qj(status=out.status), spec=qc.validate(obj), resolution=resolution, job=j, pods=pods,
                           now="2026-03-03T00:00:00Z")
        assert again.status == out.status and again.events == []


def test_calibration_data_a_method_does_not_read_is_said_in_the_condition():
    d = decide(qj(calibration={"uri": "s3://b/cal.jsonl"}), None, job([("Complete", "", "")]),
               [pod(0, json.dumps(REPORT))], AT)
    message = cond(d.status, "Succeeded")["message"]
    assert "calibration.uri is set but int8-dynamic does not calibrate" in message, message
    d = decide(qj(), None, job([("Complete", "", "")]), [pod(0, json.dumps(REPORT))], AT)
    assert "calibrat" not in cond(d.status, "Succeeded")["message"]


def test_a_calibrated_method_shows_the_uncalibrated_one_next_to_it():
    report = {**REPORT, "method": "int4-weight-only-awq",
              "uncalibrated": {"method": "int4-weight-only", "perplexity": 21.0, "perplexityIncreasePercent": 5.0,
                               "task": {"metric": "accuracy", "value": 0.9}}}
    spec = {"method": "int4-weight-only-awq", "calibration": {"uri": "s3://b/cal.jsonl"}}
    d = decide(qj(**spec), None, job([("Complete", "", "")]), [pod(0, json.dumps(report))], AT)
    message = cond(d.status, "Succeeded")["message"]
    assert "(without calibration, int4-weight-only: perplexity +5%, accuracy 90.0%)" in message, message
    assert "does not calibrate" not in message
    assert d.status["result"]["uncalibrated"]["perplexity"] == 21.0
