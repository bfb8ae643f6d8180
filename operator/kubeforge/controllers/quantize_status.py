"""QuantizeJob status from what the cluster shows: pure functions, tested without a cluster.

Called by :mod:`kubeforge.controllers.quantize` on every sync of a QuantizeJob, with the
objects read from the API: the input's :class:`~.references.Resolution` (until the Job
exists), the quantizer Job and, once it has finished, its pod. :func:`compute` returns the
new status, the events to post and, when the input is ready and there is no Job yet, the
model URI to create the Job for. The quantizer's JSON report is read from the terminated
container's termination message (the pod has no API token) into ``status.result``; exit
code 79 fails the job with ``QualityGateFailed`` and the numbers, 78 with
``ConfigurationError``. A terminal QuantizeJob is never resurrected: once ``Succeeded`` or
``Failed`` its status does not change again.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from typing import Any

from kubeforge_runtime import contract
from pydantic import ValidationError

from ..api.quantize import CALIBRATED_METHODS, QuantizeJobSpec, QuantizeResult
from ..builders import quantize as builder
from .conditions import TERMINAL_PHASES, Event, Outcome, accept, get_condition, set_condition, true_condition
from .references import Resolution

log = logging.getLogger(__name__)

_RESULT_KEYS = set(QuantizeResult.model_fields) | {f.alias for f in QuantizeResult.model_fields.values() if f.alias}
FINISHED = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")
"""Job conditions after which the Job's pod has its last word (its termination message)."""


@dataclass
class QuantizeOutcome(Outcome):
    create_with_model_uri: str | None = None
    """Create the ConfigMap and Job for this model now (the input is ready, no Job yet)."""


def validate(obj: dict[str, Any]) -> QuantizeJobSpec:
    """The typed spec, or ValidationError."""
    return QuantizeJobSpec.model_validate(obj.get("spec") or {})


def parse_report(message: str | None) -> dict[str, Any] | None:
    """The quantizer's JSON report from a termination message, or None.

    With ``FallbackToLogsOnError`` a crash before the report was written leaves the log tail
    instead; a JSON object on the last line of it (the runner logs its report) still counts.
    """
    if not message:
        return None
    candidates = [message.strip()] + [line.strip() for line in reversed(message.strip().splitlines())]
    for text in candidates:
        if not text.startswith("{"):
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return data
    return None


def result_from_report(report: dict[str, Any]) -> dict[str, Any] | None:
    """``status.result`` from the report: the known keys, validated; None when nothing usable."""
    known = {k: v for k, v in report.items() if k in _RESULT_KEYS}
    if not known:
        return None
    try:
        return QuantizeResult.model_validate(known).to_api() or None
    except ValidationError as exc:
        log.warning("quantizer report does not match status.result: %s", exc)
        return None


def terminated_container(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The most recently terminated quantize container among ``pods`` (its ``terminated`` state)."""
    latest: dict[str, Any] | None = None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") != builder.CONTAINER_NAME:
                continue
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term and (latest is None or (term.get("finishedAt") or "") >= (latest.get("finishedAt") or "")):
                latest = term
    return latest


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) else "?"


def gate_message(result: dict[str, Any] | None, spec: QuantizeJobSpec) -> str:
    ev = spec.evaluation
    limit = ev.max_perplexity_increase_percent
    kept = f"the output at {spec.output.uri} is kept but marked rejected"
    if not result:
        return (f"the quality gate failed (perplexity may rise at most {limit:g}%), but the quantizer left no "
                f"report; {kept}")
    ppl = result.get("perplexity") or {}
    increase = result.get("perplexityIncreasePercent")
    perplexity = (f"perplexity rose {_fmt(increase)}% ({_fmt(ppl.get('before'))} -> {_fmt(ppl.get('after'))}), "
                  f"more than the {limit:g}% allowed (evaluation.maxPerplexityIncreasePercent)")
    reasons = [perplexity] if not isinstance(increase, (int, float)) or increase > limit else []
    drop, task = result.get("taskDropPoints"), result.get("task") or {}
    if ev.max_accuracy_drop_points is not None and isinstance(drop, (int, float)) and drop > ev.max_accuracy_drop_points:
        reasons.append(f"{task.get('metric', 'the task metric')} fell {drop:.1f} points ({_pct(task.get('before'))} -> "
                       f"{_pct(task.get('after'))}), more than the {ev.max_accuracy_drop_points:g} allowed "
                       f"(evaluation.maxAccuracyDropPoints)")
    return ("; ".join(reasons or [perplexity]) + _uncalibrated_text(result) + calibration_note(spec)
            + f"; {kept}; try a gentler method (e.g. int8-weight-only) or raise the limit")


def success_message(result: dict[str, Any] | None, spec: QuantizeJobSpec) -> str:
    if not result:
        return f"{spec.method} model written to {spec.output.uri} (no report was found)"
    ppl = result.get("perplexityIncreasePercent")
    lat = result.get("latencyMsPerToken") or {}
    task = result.get("task")
    task_text = f", {task.get('metric')} {_pct(task.get('before'))} -> {_pct(task.get('after'))}" if task else ""
    return (f"{spec.method}: {_fmt(result.get('compressionRatio'), 3)}x smaller, "
            f"{_fmt(lat.get('before'))} -> {_fmt(lat.get('after'))} ms/token, perplexity "
            f"{'+' if isinstance(ppl, (int, float)) and ppl >= 0 else ''}{_fmt(ppl)}%{task_text}"
            f"{_uncalibrated_text(result)}{calibration_note(spec)}; written to {spec.output.uri}"
            + (f"; {result['latencyNote']}" if result.get("latencyNote") else ""))


def calibration_note(spec: QuantizeJobSpec) -> str:
    """Said in the condition message when calibration data is given to a method that does not read it."""
    if spec.calibration.uri is None or spec.method in CALIBRATED_METHODS:
        return ""
    return f"; calibration.uri is set but {spec.method} does not calibrate: the calibration data was not read"


def _uncalibrated_text(result: dict[str, Any]) -> str:
    """A calibrating method's comparison: the same method without calibration, same data."""
    other = result.get("uncalibrated") or {}
    if not other:
        return ""
    ppl, task = other.get("perplexityIncreasePercent"), other.get("task") or {}
    sign = "+" if isinstance(ppl, (int, float)) and ppl >= 0 else ""
    task_text = f", {task.get('metric')} {_pct(task.get('value'))}" if task else ""
    return f" (without calibration, {other.get('method')}: perplexity {sign}{_fmt(ppl)}%{task_text})"


def _pct(value: Any) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, (int, float)) else "?"


def _tail(text: str | None, limit: int = 400) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def compute(obj: dict[str, Any], *, spec: QuantizeJobSpec, resolution: Resolution | None,
            job: dict[str, Any] | None, pods: list[dict[str, Any]], now: str) -> QuantizeOutcome:
    """The QuantizeJob's next status from ``obj`` (as read, with its current status), its
    valid ``spec``, what its input yields (``resolution``; only looked at while there is no
    Job), the child ``job`` (None: not created yet) and its ``pods`` (read once it finished)."""
    old: dict[str, Any] = copy.deepcopy(obj.get("status") or {})
    if old.get("phase") in TERMINAL_PHASES:
        return QuantizeOutcome(status=old)  # never resurrected
    meta = obj.get("metadata") or {}
    generation = meta.get("generation")
    st = copy.deepcopy(old)
    st["observedGeneration"] = generation
    conds, events = accept(st.get("conditions"), generation, now)

    def finish(phase: str, reason: str, message: str, *, succeeded: bool) -> None:
        nonlocal conds
        conds = set_condition(conds, "Running", False, "Completed" if succeeded else reason, message, generation, now)
        conds = set_condition(conds, "Succeeded" if succeeded else "Failed", True, reason, message, generation, now)
        st["phase"] = phase
        st.setdefault("completionTime", now)

    create_uri: str | None = None
    if job is None:
        # 1. The input.
        res = resolution
        assert res is not None, "the input is resolved while there is no Job"
        if res.state == "ready":
            conds = set_condition(conds, "InputReady", True, res.reason, res.message, generation, now)
            conds = set_condition(conds, "Running", False, "JobCreated",
                                  f"created Job {builder.job_name(meta.get('name', ''))}", generation, now)
            st["modelUri"] = res.uri
            st["phase"] = "Pending"
            create_uri = res.uri
        elif res.state == "failed":
            conds = set_condition(conds, "InputReady", False, res.reason, res.message, generation, now)
            finish("Failed", res.reason, res.message, succeeded=False)
        else:
            conds = set_condition(conds, "InputReady", False, res.reason, res.message, generation, now)
            st["phase"] = "WaitingForInput"
    else:
        # 2. The Job's progress and outcome.
        jstatus = job.get("status") or {}
        if jstatus.get("startTime"):
            st.setdefault("startTime", jstatus["startTime"])
        st.setdefault("modelUri", ((job.get("metadata") or {}).get("annotations") or {}).get(builder.ANNOTATION_MODEL_URI))
        if st.get("modelUri") is None:
            st.pop("modelUri")
        done = true_condition(job, "Complete", "SuccessCriteriaMet")
        failed = true_condition(job, "Failed", "FailureTarget")
        term = terminated_container(pods) if (done or failed) else None
        report = parse_report(term.get("message") if term else None)
        result = result_from_report(report) if report else None
        if result:
            st["result"] = result
        if done:
            if result and result.get("gatePassed") is False:
                finish("Failed", "QualityGateFailed", gate_message(result, spec), succeeded=False)
            else:
                st["output"] = {"uri": spec.output.uri}
                finish("Succeeded", "Succeeded", success_message(result, spec), succeeded=True)
                st["completionTime"] = jstatus.get("completionTime") or st.get("completionTime") or now
        elif failed:
            code = term.get("exitCode") if term else None
            if code == contract.EXIT_QUALITY_GATE_FAILED:
                finish("Failed", "QualityGateFailed", gate_message(result, spec), succeeded=False)
            elif code == contract.EXIT_CONFIG_ERROR:
                detail = (report or {}).get("message") or _tail(term.get("message") if term else None)
                finish("Failed", "ConfigurationError",
                       f"the quantizer rejected its configuration (exit 78): {detail or 'no message'}; "
                       f"fix the spec and create a new QuantizeJob", succeeded=False)
            else:
                reason = failed.get("reason") or "JobFailed"
                detail = failed.get("message") or ""
                if term is not None:
                    detail += f" (last exit code {term.get('exitCode')}"
                    tail = (report or {}).get("message") or _tail(term.get("message"))
                    detail += f": {tail})" if tail else ")"
                finish("Failed", reason, detail.strip() or "the quantizer Job failed", succeeded=False)
        elif (jstatus.get("ready") or 0) > 0 or ((jstatus.get("active") or 0) > 0 and jstatus.get("ready") is None):
            conds = set_condition(conds, "Running", True, "Running", "the quantizer pod is running", generation, now)
            st["phase"] = "Running"
        else:
            suspended = bool((job.get("spec") or {}).get("suspend"))
            reason, msg = (("Queued", "the Job is suspended (queued for admission)") if suspended
                           else ("PodStarting", "waiting for the quantizer pod to start"))
            conds = set_condition(conds, "Running", False, reason, msg, generation, now)
            st["phase"] = "Pending"

    st["conditions"] = conds
    old_phase = old.get("phase")
    if st.get("phase") != old_phase:
        phase = st.get("phase")
        if phase in ("Succeeded", "Failed"):
            cond = get_condition(conds, phase) or {}
            events.append(Event("Normal" if phase == "Succeeded" else "Warning", cond.get("reason", phase),
                                cond.get("message", "")))
        elif phase == "WaitingForInput":
            events.append(Event("Normal", "WaitingForInput", (get_condition(conds, "InputReady") or {}).get("message", "")))
        elif phase == "Running":
            events.append(Event("Normal", "Running", "the quantizer pod is running"))
    if create_uri:
        events.append(Event("Normal", "JobCreated", f"quantizing {create_uri} with {spec.method}"))
    return QuantizeOutcome(status=st, events=events, create_with_model_uri=create_uri)


