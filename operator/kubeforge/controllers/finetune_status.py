"""FineTuneJob status from what the cluster shows: pure functions, tested without a cluster.

Called by :mod:`kubeforge.controllers.finetune` on every sync of a FineTuneJob (its own
events, its Job's and its worker pods'), with the objects read from the API:
:func:`validate` checks what the schema cannot, :func:`compute` returns the new status, the
events to post and the pod UIDs whose failure has now been counted. No I/O: the same inputs
always give the same status (and re-running a reconcile with nothing new changes nothing).

Phases:

* ``Pending``    children created, not enough workers ready yet (or queued: Job suspended by
                 Kueue);
* ``Running``    at least ``nodes.min`` workers ready and no worker waiting for a replacement;
* ``Restarting`` a worker failed (or was disrupted) and its replacement is not ready yet;
* ``Suspended``  ``spec.suspend``: the Job is suspended, its pods deleted;
* ``Succeeded`` / ``Failed``  terminal, from the Job's own conditions (or a worker's
                 configuration-error exit code, which the podFailurePolicy turns into a
                 failed Job anyway). A terminal phase is never left again.

A configuration-error exit whose termination message is the preflight's data-quality report
(``contract.DATA_QUALITY_REPORT_KIND``: a ``spec.dataset.checks`` red line crossed) fails
the job with reason ``DataQualityFailed``, the report's message, and the measurements,
thresholds and violations in ``status.result.dataQuality``.

With ``spec.dataset.checks`` the workers wait for the data gate (the ``<name>-datacheck``
Job, :func:`gate_state`): while it runs the job is ``Pending`` with ``DataChecked=Unknown``
(reason ``DataCheckRunning``) and ``Created=False`` (``WaitingForDataCheck``); when it passes,
``DataChecked=True`` (``DataCheckPassed``), its measurements go to ``status.result.dataQuality``
and the controller creates the workers; a crossed line fails the job with ``DataQualityFailed``
(no worker was ever created); a gate that cannot run (a bad config or data file: exit 78
without a report; failures beyond its back-off limit) fails it with ``ConfigurationError`` or
``DataCheckFailed``, saying what the gate pod said.

Restarts are counted per worker pod, once: a pod that failed on its own (any exit code but
the configuration error) or that was disrupted (the ``DisruptionTarget`` condition:
eviction, preemption, drain). Pods the Job controller deletes itself (suspend, deadline,
success) are not restarts. The UIDs already counted are kept by the caller (an annotation),
so an operator restart never counts a pod twice.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import Any

from kubeforge_runtime import contract

from ..api import InvalidSpec
from ..api.finetune import DataQualityResult, FineTuneJobSpec, TrainResult
from ..builders import finetune as builder
from .conditions import (TERMINAL_PHASES, Event, Outcome, accept, get_condition, is_true, set_condition,
                         true_condition)
from .references import Resolution

COMPLETION_INDEX_ANNOTATION = builder.COMPLETION_INDEX_ANNOTATION
MAX_TERMINATION_MESSAGE = 600
MAX_COUNTED_UIDS = 64
"""How many counted pod UIDs are remembered; a pod's UID is never reused, and a failed pod
older than the last 64 failures is long gone, so a short list is enough."""


@dataclass
class FineTuneOutcome(Outcome):
    counted: list[str] = field(default_factory=list)
    """Pod UIDs whose failure is counted, oldest first (to store back)."""
    new_restarts: list[str] = field(default_factory=list)
    """Reasons of the restarts counted in this call (Failure, Disruption): for metrics."""
    became_running_first_time: bool = False


def validate(obj: dict[str, Any]) -> FineTuneJobSpec:
    """The typed spec, or ValidationError/InvalidSpec (the name must fit the children's names)."""
    spec = FineTuneJobSpec.model_validate(obj.get("spec") or {})
    problem = builder.name_problem((obj.get("metadata") or {}).get("name", ""))
    if problem:
        raise InvalidSpec(problem)
    return spec


# --- reading pods and Jobs -----------------------------------------------------------------

def pod_index(pod: dict[str, Any]) -> int | None:
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _terminated(pod: dict[str, Any], container: str = builder.CONTAINER) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == container and "terminated" in (cs.get("state") or {}):
            return cs["state"]["terminated"]
    return None


def exit_code(pod: dict[str, Any]) -> int | None:
    term = _terminated(pod)
    return None if term is None else term.get("exitCode")


def termination_message(pod: dict[str, Any]) -> str:
    term = _terminated(pod) or {}
    msg = (term.get("message") or "").strip()
    return msg[-MAX_TERMINATION_MESSAGE:]


def is_ready(pod: dict[str, Any]) -> bool:
    st = pod.get("status") or {}
    return (st.get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")
            and any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or []))


def failure_kind(pod: dict[str, Any]) -> str | None:
    """``Disruption``, ``ConfigurationError``, ``Failure`` or None (not a worker failure)."""
    if true_condition(pod, "DisruptionTarget"):
        return "Disruption"
    if (pod.get("status") or {}).get("phase") != "Failed":
        return None
    if pod["metadata"].get("deletionTimestamp"):
        # Deleted by a controller (the Job's suspend, deadline or success handling, garbage
        # collection), not a crash: not a restart.
        return None
    if exit_code(pod) == contract.EXIT_CONFIG_ERROR:
        return "ConfigurationError"
    return "Failure"


def _created(pod: dict[str, Any]) -> str:
    return pod["metadata"].get("creationTimestamp") or ""


def current_pods(pods: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The newest pod of every completion index."""
    out: dict[int, dict[str, Any]] = {}
    for pod in sorted(pods, key=lambda p: (_created(p), p["metadata"].get("name", ""))):
        idx = pod_index(pod)
        if idx is not None:
            out[idx] = pod
    return out


def _finite(value: Any) -> Any:
    # json.loads accepts NaN and Infinity; the API server rejects them in a status (400).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def data_quality_report(pod: dict[str, Any], container: str = builder.CONTAINER,
                        exit_code: int = contract.EXIT_CONFIG_ERROR) -> dict[str, Any] | None:
    """The preflight's data-quality report of a pod whose ``container`` exited with
    ``exit_code`` (a worker's preflight: the configuration error; the data gate: 78 or 0), or
    None (another message, another exit code, or not exited)."""
    term = _terminated(pod, container) or {}
    if term.get("exitCode") != exit_code:
        return None
    try:
        body = json.loads((term.get("message") or "").strip())
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("kind") != contract.DATA_QUALITY_REPORT_KIND:
        return None
    return _finite(body)


def _data_quality_result(report: dict[str, Any]) -> dict[str, Any]:
    """``status.result.dataQuality`` from a report: the fields the API knows, validated (a
    malformed report is dropped rather than breaking the status patch)."""
    fields = {f.alias or name for name, f in DataQualityResult.model_fields.items()}
    body = {k: v for k, v in report.items() if k in fields}
    try:
        return DataQualityResult.model_validate(body).model_dump(by_alias=True, exclude_none=True)
    except ValueError:
        return {"passed": False, "violations": [str(v) for v in report.get("violations") or []][:10]}


def trainer_result(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``status.result`` from the succeeded worker whose trainer (global rank 0) wrote its
    compact result into the termination log (``contract.RESULT_KIND``); None if none did."""
    fields = {f.alias or name for name, f in TrainResult.model_fields.items()}
    for pod in sorted(pods, key=_created, reverse=True):
        term = _terminated(pod) or {}
        if term.get("exitCode") != 0:
            continue
        try:
            body = json.loads((term.get("message") or "").strip())
        except ValueError:
            continue
        if isinstance(body, dict) and body.get("kind") == contract.RESULT_KIND:
            return _finite({k: v for k, v in body.items() if k in fields})
    return None


# --- the data gate (spec.dataset.checks) -------------------------------------------------------

@dataclass(frozen=True)
class Gate:
    """What the data gate Job shows. ``state``: ``Pending`` (no Job yet), ``Running``,
    ``Passed``, or a failure reason: ``DataQualityFailed`` (a crossed line),
    ``ConfigurationError`` (exit 78 without a report: the gate could not use the config or the
    data file), ``DataCheckFailed`` (failed otherwise, beyond its back-off limit)."""

    state: str
    message: str
    report: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return self.state == "Passed"

    @property
    def failed(self) -> bool:
        return self.state not in ("Pending", "Running", "Passed")


def _gate_pod_text(pod: dict[str, Any]) -> str:
    term = _terminated(pod, builder.DATACHECK_CONTAINER) or {}
    msg = (term.get("message") or "").strip()[-MAX_TERMINATION_MESSAGE:]
    return f"data check pod {pod['metadata']['name']} exited with code {term.get('exitCode')}" + (
        f": {msg}" if msg else "")


def gate_state(job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> Gate:
    """The data gate's verdict from its Job and that Job's pods (newest decides)."""
    if job is None:
        return Gate("Pending", "creating the data check Job")
    name = job["metadata"]["name"]
    by_age = sorted(pods, key=_created, reverse=True)
    for pod in by_age:
        report = data_quality_report(pod, builder.DATACHECK_CONTAINER)
        if report is not None:
            return Gate("DataQualityFailed", f"the data check (Job {name}) found a red line crossed before any "
                                             f"worker was created: {report.get('message') or report.get('violations')}",
                        report)
        passed = data_quality_report(pod, builder.DATACHECK_CONTAINER, exit_code=0)
        if passed is not None and passed.get("passed") is True:
            return Gate("Passed", f"data checks passed (Job {name}): " + ", ".join(
                f"{k} {v}" for k, v in (passed.get("measurements") or {}).items()), passed)
        if (_terminated(pod, builder.DATACHECK_CONTAINER) or {}).get("exitCode") == contract.EXIT_CONFIG_ERROR:
            return Gate("ConfigurationError", f"{_gate_pod_text(pod)}; fix the spec (dataset) and create the job again")
    done = true_condition(job, "Complete", "SuccessCriteriaMet")
    if done is not None:
        # Finished without a report: an image whose runtime has no --data-check, or a lost message.
        return Gate("DataCheckFailed", f"the data check Job {name} finished without a DataQualityReport in its "
                                       "termination log; is the runtime image older than the operator?")
    failed = true_condition(job, "Failed", "FailureTarget")
    if failed is not None:
        last = next((p for p in by_age if _terminated(p, builder.DATACHECK_CONTAINER)), None)
        tail = f"; last: {_gate_pod_text(last)}" if last is not None else ""
        return Gate("DataCheckFailed", f"the data check Job {name} failed ({failed.get('reason')}: "
                                       f"{failed.get('message', '')}){tail}")
    unschedulable = next((c for p in by_age for c in (p.get("status") or {}).get("conditions") or []
                          if c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable"), None)
    if unschedulable:
        return Gate("Running", f"the data check pod is not schedulable: {unschedulable.get('message', '')}"
                    [:MAX_TERMINATION_MESSAGE])
    return Gate("Running", f"checking spec.dataset.checks on the training data (Job {name}) before creating workers")


def _gate(out: FineTuneOutcome, status: dict[str, Any], conds: list[dict[str, Any]], prev_phase: str | None,
          spec: FineTuneJobSpec, gate: Gate, generation: int | None, now: str
          ) -> tuple[list[dict[str, Any]], FineTuneOutcome | None]:
    """The gate's part of the status: the conditions so far, and the whole outcome when the
    gate decides it (still running, or failed); None when the workers' status follows."""
    if gate.passed:
        if not is_true(conds, "DataChecked"):
            out.events.append(Event("Normal", "DataCheckPassed", gate.message))
        conds = set_condition(conds, "DataChecked", True, "DataCheckPassed", gate.message, generation, now)
        if gate.report is not None:
            status["result"] = {**(status.get("result") or {}), "dataQuality": _data_quality_result(gate.report)}
        return conds, None
    if gate.failed:
        conds = set_condition(conds, "DataChecked", False, gate.state, gate.message, generation, now)
        conds = set_condition(conds, "Failed", True, gate.state, gate.message, generation, now)
        conds = set_condition(conds, "Running", False, gate.state, "the data check failed; no worker was created",
                              generation, now)
        status["completionTime"] = now
        if gate.report is not None:
            status["result"] = {"dataQuality": _data_quality_result(gate.report)}
        out.events.append(Event("Warning", gate.state, gate.message))
        return conds, _finish(out, status, conds, prev_phase, "Failed", generation, now, None, announce=False)
    conds = set_condition(conds, "DataChecked", "Unknown", "DataCheckRunning", gate.message, generation, now)
    conds = set_condition(conds, "Created", False, "WaitingForDataCheck",
                          "the workers are created once the data check passes", generation, now)
    if spec.suspend:
        conds = set_condition(conds, "Suspended", True, "Suspended",
                              "spec.suspend is true: the data check waits", generation, now)
        conds = set_condition(conds, "Running", False, "Suspended", "suspended", generation, now)
        return conds, _finish(out, status, conds, prev_phase, "Suspended", generation, now, None)
    if get_condition(conds, "Suspended"):
        conds = set_condition(conds, "Suspended", False, "Resumed", "spec.suspend is false", generation, now)
    conds = set_condition(conds, "Running", False, "DataCheckRunning", "no workers before the data check passes",
                          generation, now)
    return conds, _finish(out, status, conds, prev_phase, "Pending", generation, now,
                          "checking the data red lines before creating workers")


# --- the status ------------------------------------------------------------------------------

def _describe_failure(pod: dict[str, Any], kind: str) -> str:
    name = pod["metadata"]["name"]
    idx = pod_index(pod)
    if kind == "Disruption":
        cond = true_condition(pod, "DisruptionTarget") or {}
        why = cond.get("reason") or "disruption"
        return f"worker {idx} (pod {name}) was disrupted ({why}); not counted against backoffLimit"
    code = exit_code(pod)
    msg = termination_message(pod)
    return f"worker {idx} (pod {name}) exited with code {code}" + (f": {msg}" if msg else "")


def _progress_percent(progress: dict[str, Any]) -> dict[str, Any]:
    step, total = progress.get("step"), progress.get("totalSteps")
    if step is not None and total:
        progress["percent"] = f"{min(100, int(100 * step / total))}%"
    return progress


def _failed_reason(job: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) when the Job has failed or is failing, else None."""
    config_pod = next((p for p in pods if failure_kind(p) == "ConfigurationError"), None)
    report = data_quality_report(config_pod) if config_pod is not None else None
    if config_pod is not None and report is not None:
        return ("DataQualityFailed",
                f"worker {pod_index(config_pod)} (pod {config_pod['metadata']['name']}) exited with code "
                f"{contract.EXIT_CONFIG_ERROR} before training: {report.get('message') or report.get('violations')}")
    if config_pod is not None:
        # The podFailurePolicy fails the Job on this exit code; say so without waiting for it.
        msg = termination_message(config_pod)
        return ("ConfigurationError",
                f"worker {pod_index(config_pod)} (pod {config_pod['metadata']['name']}) exited with code "
                f"{contract.EXIT_CONFIG_ERROR}: the trainer rejected its configuration; fix the spec and create "
                "the job again" + (f". The trainer said: {msg}" if msg else ""))
    cond = true_condition(job, "Failed") or true_condition(job, "FailureTarget")
    if cond is None:
        return None
    reason = cond.get("reason") or "Failed"
    message = cond.get("message") or ""
    if reason == "BackoffLimitExceeded":
        last = [p for p in pods if failure_kind(p) == "Failure"]
        tail = f"; last failure: {_describe_failure(last[-1], 'Failure')}" if last else ""
        return reason, f"workers failed more often than backoffLimit allows ({message}){tail}"
    if reason == "DeadlineExceeded":
        return reason, f"the job ran longer than activeDeadlineSeconds ({message})"
    return reason, message


def cache_can_tell(prev: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether ``new``, a status computed from the watch cache, may be written without fresh
    reads: only good news. A pod the cache has not seen yet (after an operator start, while its
    pod watch's first listing is still coming in) can only lower the worker counts, never raise
    them, so fewer workers than ``prev`` shows, or a Restarting phase, is confirmed on fresh
    reads first (a worker really lost is then reported a moment later, never a lost one invented)."""
    old_w, new_w = prev.get("workers") or {}, new.get("workers") or {}
    return (new.get("phase") != "Restarting"
            and int(new_w.get("ready") or 0) >= int(old_w.get("ready") or 0)
            and int(new_w.get("total") or 0) >= int(old_w.get("total") or 0))


def compute(
    obj: dict[str, Any],
    *,
    spec: FineTuneJobSpec,
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    counted: list[str],
    progress: dict[str, Any] | None,
    now: str,
    gate: Gate | None = None,
    teacher: Resolution | None = None,
) -> FineTuneOutcome:
    """The FineTuneJob's next status from ``obj`` (as read, with its current status), its
    valid ``spec``, its Job and pods, the pod UIDs already counted and the last progress.
    ``gate``: the data gate's state while it matters (``spec.dataset.checks`` set, not yet
    recorded as passed, no worker Job yet), else None; ``teacher``: what a
    ``distillation.teacher.fineTuneJobRef`` yields now (None without one)."""
    prev: dict[str, Any] = obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    status: dict[str, Any] = {k: v for k, v in prev.items()}
    conds, accepted = accept(prev.get("conditions"), generation, now)
    prev_phase = prev.get("phase")
    out = FineTuneOutcome(status=status, counted=list(counted))
    if prev_phase not in TERMINAL_PHASES:
        # A finished job accepts nothing new (it is never resurrected): no event.
        out.events += accepted
    status["observedGeneration"] = generation
    if prev_phase in TERMINAL_PHASES:
        # Never resurrected: a terminal status stays as it is (bar the generation seen), its
        # progress too: the poller's last scrape is older than the final step it shows.
        status["conditions"] = conds
        return out

    if progress:
        # Non-finite values (never from progress_from_metrics, but a status the API server
        # refuses would stop the job from ever finishing) are left out.
        status["progress"] = _progress_percent({k: v for k, v in _finite(dict(progress)).items() if v is not None})
        ckpt = progress.get("lastCheckpointStep")
        status["progress"].pop("lastCheckpointStep", None)
        if ckpt:
            status["lastCheckpoint"] = f"{builder.checkpoint_uri(spec).rstrip('/')}/step-{int(ckpt):08d}"

    current = current_pods(pods)
    ready = sum(1 for p in current.values() if is_ready(p))
    total = sum(1 for p in current.values()
                if (p.get("status") or {}).get("phase") in ("Pending", "Running")
                and not p["metadata"].get("deletionTimestamp"))
    status["workers"] = {"ready": ready, "total": total, "min": spec.nodes.min, "max": spec.nodes.max}

    if teacher is not None:
        conds = set_condition(conds, "InputReady", teacher.state == "ready", teacher.reason,
                              f"distillation teacher: {teacher.message}", generation, now)
    if job is None and teacher is not None and teacher.state == "failed":
        message = f"distillation teacher: {teacher.message}"
        conds = set_condition(conds, "Failed", True, "InputFailed", message, generation, now)
        status["completionTime"] = now
        out.events.append(Event("Warning", "InputFailed", message))
        return _finish(out, status, conds, prev_phase, "Failed", generation, now, None, announce=False)
    if job is None and teacher is not None and teacher.state != "ready":
        conds = set_condition(conds, "Created", False, "WaitingForInput", f"distillation teacher: {teacher.message}",
                              generation, now)
        conds = set_condition(conds, "Running", False, "Pending", "no workers yet", generation, now)
        if (get_condition(prev.get("conditions") or [], "InputReady") or {}).get("reason") != teacher.reason:
            out.events.append(Event("Normal", "WaitingForInput", f"distillation teacher: {teacher.message}"))
        return _finish(out, status, conds, prev_phase, "Pending", generation, now, None)
    if gate is not None and (job is None or gate.passed):
        conds, decided = _gate(out, status, conds, prev_phase, spec, gate, generation, now)
        if decided is not None:
            return decided
    if job is None:
        phase = "Pending"
        conds = set_condition(conds, "Created", False, "Creating", "creating the Service, ConfigMap and Job", generation, now)
        conds = set_condition(conds, "Running", False, "Pending", "no workers yet", generation, now)
        return _finish(out, status, conds, prev_phase, phase, generation, now, None)
    names = builder.Names.of(job["metadata"]["name"])
    if not get_condition(conds, "Created") or get_condition(conds, "Created").get("status") != "True":
        _announce_created(out, f"created Service {names.service}, ConfigMap {names.config_map} and Job {names.job}")
    conds = set_condition(conds, "Created", True, "ChildrenCreated",
                          f"Service {names.service}, ConfigMap {names.config_map}, Job {names.job}", generation, now)

    # Restarts: every failed or disrupted worker pod, once.
    job_suspended = bool((job.get("spec") or {}).get("suspend"))
    new_failures: list[tuple[dict[str, Any], str]] = []
    for pod in sorted(pods, key=_created):
        kind = failure_kind(pod)
        uid = pod["metadata"].get("uid")
        if kind in ("Failure", "Disruption") and uid and uid not in out.counted:
            new_failures.append((pod, kind))
            out.counted.append(uid)
    out.counted = out.counted[-MAX_COUNTED_UIDS:]

    failed = _failed_reason(job, pods)
    succeeded = true_condition(job, "Complete") or true_condition(job, "SuccessCriteriaMet")
    if failed is not None:
        reason, message = failed
        conds = set_condition(conds, "Failed", True, reason, message, generation, now)
        conds = set_condition(conds, "Running", False, reason, "the job failed", generation, now)
        if get_condition(conds, "Restarting"):
            conds = set_condition(conds, "Restarting", False, reason, "the job failed", generation, now)
        status["completionTime"] = now
        if reason == "DataQualityFailed":
            report = next(r for p in pods if (r := data_quality_report(p)) is not None)
            status["result"] = {"dataQuality": _data_quality_result(report)}
        out.events.append(Event("Warning", reason, message))
        return _finish(out, status, conds, prev_phase, "Failed", generation, now, None, announce=False)
    if succeeded:
        conds = set_condition(conds, "Succeeded", True, "Completed",
                              f"all workers finished; output at {spec.output.uri}", generation, now)
        conds = set_condition(conds, "Running", False, "Completed", "the job finished", generation, now)
        if get_condition(conds, "Restarting"):
            conds = set_condition(conds, "Restarting", False, "Completed", "the job finished", generation, now)
        status["completionTime"] = now
        status["output"] = {"uri": spec.output.uri}
        result = trainer_result(pods)
        if result:
            # The trainer reports the preflight's measurements too; the gate's stay otherwise.
            gated = (status.get("result") or {}).get("dataQuality")
            status["result"] = {**({"dataQuality": gated} if gated else {}), **result}
        if status.get("progress", {}).get("totalSteps"):
            status["progress"]["step"] = status["progress"]["totalSteps"]
            status["progress"]["percent"] = "100%"
            status["progress"]["etaSeconds"] = 0
        return _finish(out, status, conds, prev_phase, "Succeeded", generation, now, None)

    if spec.suspend or job_suspended:
        if spec.suspend:
            phase = "Suspended"
            conds = set_condition(conds, "Suspended", True, "Suspended",
                                  "spec.suspend is true: workers stopped; resuming continues from the last checkpoint",
                                  generation, now)
            conds = set_condition(conds, "Running", False, "Suspended", "suspended", generation, now)
        else:
            phase = "Pending"  # suspended by a queue (Kueue) until admitted
            conds = set_condition(conds, "Running", False, "Queued", "waiting for the Job to be admitted", generation, now)
        if get_condition(conds, "Restarting"):
            conds = set_condition(conds, "Restarting", False, phase, "workers stopped", generation, now)
        return _finish(out, status, conds, prev_phase, phase, generation, now, None)
    if get_condition(conds, "Suspended"):
        conds = set_condition(conds, "Suspended", False, "Resumed", "spec.suspend is false", generation, now)

    status["restarts"] = int(prev.get("restarts") or 0) + len(new_failures)
    for pod, kind in new_failures:
        out.new_restarts.append(kind)
        out.events.append(Event("Warning", "WorkerDisrupted" if kind == "Disruption" else "WorkerFailed",
                                _describe_failure(pod, kind)))

    waiting = [i for i, p in current.items()
               if (p.get("status") or {}).get("phase") == "Failed" or p["metadata"].get("deletionTimestamp")]
    all_up = ready >= spec.nodes.min and not waiting
    restart_msg = None
    if new_failures or (prev_phase in ("Running", "Restarting") and not all_up):
        phase = "Restarting"
        if new_failures:
            pod, kind = new_failures[-1]
            restart_msg = _describe_failure(pod, kind)
            reason = "WorkerDisrupted" if kind == "Disruption" else "WorkerFailed"
        else:
            old = get_condition(conds, "Restarting")
            reason = old.get("reason") if old and old.get("status") == "True" else "WorkersLost"
            restart_msg = old.get("message") if old and old.get("status") == "True" else \
                f"{ready} of {spec.nodes.min} required workers ready"
        conds = set_condition(conds, "Restarting", True, reason, restart_msg, generation, now)
        conds = set_condition(conds, "Running", False, "Restarting",
                              f"{ready}/{spec.nodes.max} workers ready; waiting for replacements", generation, now)
    elif all_up:
        phase = "Running"
        conds = set_condition(conds, "Running", True, "WorkersReady",
                              f"{ready}/{spec.nodes.max} workers ready (min {spec.nodes.min})", generation, now)
        if get_condition(conds, "Restarting"):
            conds = set_condition(conds, "Restarting", False, "Recovered", "all workers ready again", generation, now)
        if not status.get("startTime"):
            status["startTime"] = now
            out.became_running_first_time = True
    else:
        phase = "Pending"
        message = f"{ready}/{spec.nodes.min} required workers ready"
        unschedulable = next((c for p in current.values() for c in (p.get("status") or {}).get("conditions") or []
                              if c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable"), None)
        if unschedulable:
            # The scheduler says why (not enough nvidia.com/gpu, a missing PVC, a taint): pass it on.
            message += f"; not schedulable: {unschedulable.get('message', '')}"[:MAX_TERMINATION_MESSAGE]
        conds = set_condition(conds, "Running", False, "Unschedulable" if unschedulable else "WaitingForWorkers",
                              message, generation, now)
    return _finish(out, status, conds, prev_phase, phase, generation, now, restart_msg)


def _announce_created(out: FineTuneOutcome, message: str) -> None:
    """The ``Created`` event; when this same sync accepted the spec (a new job's first sync),
    its ``Accepted`` event says it instead: one Event per new job, saying both."""
    accepted = next((i for i, e in enumerate(out.events) if e.reason == "Accepted"), None)
    if accepted is not None:
        ev = out.events[accepted]
        out.events[accepted] = Event(ev.type, ev.reason, f"{ev.message}; {message}")
    else:
        out.events.append(Event("Normal", "Created", message))


_PHASE_EVENTS = {
    "Pending": ("Normal", "Pending", "waiting for workers"),
    "Running": ("Normal", "Running", "workers ready"),
    "Restarting": ("Warning", "Restarting", "a worker failed; waiting for its replacement"),
    "Suspended": ("Normal", "Suspended", "workers stopped"),
    "Succeeded": ("Normal", "Succeeded", "training finished"),
}


def _finish(out: FineTuneOutcome, status: dict[str, Any], conds: list[dict[str, Any]], prev_phase: str | None,
            phase: str, generation: int | None, now: str, detail: str | None,
            announce: bool = True) -> FineTuneOutcome:
    status["conditions"] = conds
    status["phase"] = phase
    if phase == "Pending" and prev_phase is None and not detail:
        # A new job starts Pending: its Accepted (and Created) events say so already; a Pending
        # event more would be one API write per job that tells nobody anything.
        announce = False
    if phase == "Running" and out.became_running_first_time:
        # Its first start: the phase, the Running condition and status.startTime say so; an
        # Event is kept for what a user must notice (a return to Running after Restarting or
        # Suspended, failures, the end).
        announce = False
    if phase != prev_phase and announce and phase in _PHASE_EVENTS:
        type_, reason, message = _PHASE_EVENTS[phase]
        if phase == "Running":
            w = status.get("workers") or {}
            message = f"{w.get('ready')}/{w.get('max')} workers ready"
        elif phase == "Succeeded":
            message = f"training finished; output at {(status.get('output') or {}).get('uri')}"
        if detail:
            message = detail
        out.events.append(Event(type_, reason, message))
    return out


# --- progress --------------------------------------------------------------------------------

def progress_from_metrics(samples: dict[str, float], spec: FineTuneJobSpec) -> dict[str, Any] | None:
    """Status progress from the rank-0 gauges (``contract.METRIC_*``), or None without a step."""
    # What a pod serves is not trusted: a step that is not a count (NaN, inf, negative, beyond
    # what JSON carries exactly) means no progress; other garbage values are left out.
    samples = {k: v for k, v in samples.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    step = _count(samples.get(contract.METRIC_STEP))
    if step is None:
        return None
    out: dict[str, Any] = {"step": step}
    total = _count(samples.get(contract.METRIC_TOTAL_STEPS))
    if total:
        out["totalSteps"] = total
    if contract.METRIC_EPOCH in samples:
        out["epoch"] = round(float(samples[contract.METRIC_EPOCH]), 3)
    if contract.METRIC_LOSS in samples:
        out["loss"] = round(float(samples[contract.METRIC_LOSS]), 5)
    tps = samples.get(contract.METRIC_TOKENS_PER_SECOND)
    if tps is not None and tps >= 0:
        out["tokensPerSecond"] = round(float(tps), 1)
        # Tokens per optimizer step = globalBatchSize x sequenceLength (every sample is packed
        # or padded to exactly sequenceLength), so steps/s follows from tokens/s.
        tokens_per_step = spec.training.global_batch_size * spec.dataset.sequence_length
        if total and tps > 0:
            out["etaSeconds"] = int(max(0, int(total) - step) * tokens_per_step / tps)
    ckpt = _count(samples.get(contract.METRIC_LAST_CHECKPOINT_STEP))
    if ckpt:
        out["lastCheckpointStep"] = ckpt
    return out


MAX_COUNT = 2 ** 53
"""Counts above this are not exact in JSON numbers: nothing a real trainer reports."""


def _count(value: float | None) -> int | None:
    """``value`` as a step count, or None when it is missing or is not one."""
    if value is None or not math.isfinite(value) or not 0 <= value <= MAX_COUNT:
        return None
    return int(value)


def ttl_due(status: dict[str, Any], ttl: int | None) -> dt.datetime | None:
    """When a finished job should be deleted (``ttlSecondsAfterFinished``), or None."""
    if ttl is None or status.get("phase") not in TERMINAL_PHASES or not status.get("completionTime"):
        return None
    done = dt.datetime.fromisoformat(status["completionTime"].replace("Z", "+00:00"))
    return done + dt.timedelta(seconds=ttl)
