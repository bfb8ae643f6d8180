"""QuantizeJob reconciler: wait for the input, run the quantizer Job, report what it cost.

Flow of one QuantizeJob:

1. the spec is validated (``Accepted``); an invalid spec is permanent (``InvalidSpec``);
2. with ``model.fineTuneJobRef`` the job waits (phase ``WaitingForInput``, condition
   ``InputReady=False/WaitingForInput``) until that FineTuneJob has ``Succeeded``, then uses its
   ``status.output.uri``; if the FineTuneJob fails, this job fails with ``InputFailed``;
3. a ConfigMap (the runtime config) and a one-pod ``batch/v1`` Job are created (pure builders
   in :mod:`kubeforge.builders.quantize`); the Job is created once and never re-applied (its
   pod template is immutable, and a started job must not change under its pod);
4. the Job's conditions give the phase (``Pending`` -> ``Running`` -> ``Succeeded``/``Failed``);
   the quantizer's JSON report is read from the terminated container's termination message
   (the pod has no API token) into ``status.result``; exit code 79 fails the job with
   ``QualityGateFailed`` and the numbers, 78 with ``ConfigurationError``.

A terminal QuantizeJob is never resurrected: once ``Succeeded`` or ``Failed`` nothing changes.

Triggers: create/update/resume of the QuantizeJob, events of the child Jobs (label
``app.kubernetes.io/component=quantizer``), events of FineTuneJobs (to start waiting jobs as
soon as their input succeeds). No timer: kopf re-lists every watched kind when a watch
restarts and resumes every object when the operator starts, which replays anything missed,
and a timer would make kopf put a finalizer on every object (deleting one would then hang
while the operator is down). Every
trigger calls :func:`reconcile`, which reads the world afresh under a per-object lock and
writes the whole status with one merge patch; :func:`decide` is the pure core the unit
tests drive.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubeforge_runtime import contract
from pydantic import ValidationError

from .. import kube
from ..api import FineTuneJob, QuantizeJob, describe_validation_error
from ..api.quantize import QuantizeJobSpec, QuantizeResult
from ..builders import quantize as builder
from .conditions import TERMINAL_PHASES, get_condition, now, set_condition
from .events import Event, post as post_event
from .references import Resolution, resolve, resolve_uri

log = logging.getLogger(__name__)

GROUP_VERSION = QuantizeJob.resource()
KIND = QuantizeJob.kind
_RESULT_KEYS = set(QuantizeResult.model_fields) | {f.alias for f in QuantizeResult.model_fields.values() if f.alias}


# --- the pure core --------------------------------------------------------------------------
@dataclass
class Decision:
    """What one reconcile concluded: the whole new status, children to create, events."""

    status: dict[str, Any]
    create_with_model_uri: str | None = None
    events: list[Event] = field(default_factory=list)


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


def _job_condition(job: dict[str, Any], *types: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in types and cond.get("status") == "True":
            return cond
    return None


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
    return "; ".join(reasons or [perplexity]) + f"; {kept}; try a gentler method (e.g. int8-weight-only) or raise the limit"


def success_message(result: dict[str, Any] | None, spec: QuantizeJobSpec) -> str:
    if not result:
        return f"{spec.method} model written to {spec.output.uri} (no report was found)"
    ppl = result.get("perplexityIncreasePercent")
    lat = result.get("latencyMsPerToken") or {}
    task = result.get("task")
    task_text = f", {task.get('metric')} {_pct(task.get('before'))} -> {_pct(task.get('after'))}" if task else ""
    return (f"{spec.method}: {_fmt(result.get('compressionRatio'), 3)}x smaller, "
            f"{_fmt(lat.get('before'))} -> {_fmt(lat.get('after'))} ms/token, perplexity "
            f"{'+' if isinstance(ppl, (int, float)) and ppl >= 0 else ''}{_fmt(ppl)}%{task_text}; "
            f"written to {spec.output.uri}")


def _pct(value: Any) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, (int, float)) else "?"


def _tail(text: str | None, limit: int = 400) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def decide(obj: dict[str, Any], reference: dict[str, Any] | None, job: dict[str, Any] | None,
           pods: list[dict[str, Any]], at: str | None = None) -> Decision:
    """Compute the QuantizeJob's next status from what was read; no I/O.

    ``reference`` is the referenced FineTuneJob (None: absent or not referenced), ``job`` the
    child Job (None: not created yet), ``pods`` the child Job's pods (read when it finished).
    """
    at = at or now()
    old: dict[str, Any] = copy.deepcopy(obj.get("status") or {})
    if old.get("phase") in TERMINAL_PHASES:
        return Decision(status=old)  # never resurrected
    meta = obj.get("metadata") or {}
    generation = meta.get("generation")
    st = copy.deepcopy(old)
    conds = st.get("conditions") or []
    events: list[Event] = []
    st["observedGeneration"] = generation

    def finish(phase: str, reason: str, message: str, *, succeeded: bool) -> None:
        nonlocal conds
        conds = set_condition(conds, "Running", False, "Completed" if succeeded else reason, message, generation, at)
        conds = set_condition(conds, "Succeeded" if succeeded else "Failed", True, reason, message, generation, at)
        st["phase"] = phase
        st.setdefault("completionTime", at)

    # 1. The spec.
    try:
        spec = QuantizeJobSpec.model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        message = describe_validation_error(exc)
        before = get_condition(conds, "Accepted")
        st["conditions"] = set_condition(conds, "Accepted", False, "InvalidSpec", message, generation, at)
        st["phase"] = old.get("phase") or "Pending"
        if not before or before.get("reason") != "InvalidSpec" or before.get("message") != message:
            events.append(Event("Warning", "InvalidSpec", message))
        return Decision(status=st, events=events)
    before = get_condition(conds, "Accepted")
    conds = set_condition(conds, "Accepted", True, "Accepted", "spec is valid", generation, at)
    if not before or before.get("status") != "True":
        events.append(Event("Normal", "Accepted", f"generation {generation} accepted"))

    create_uri: str | None = None
    if job is None:
        # 2. The input.
        ref = spec.model.fine_tune_job_ref
        res: Resolution = resolve_uri(spec.model.uri) if ref is None else resolve("FineTuneJob", ref.name, reference)
        if res.state == "ready":
            conds = set_condition(conds, "InputReady", True, res.reason, res.message, generation, at)
            conds = set_condition(conds, "Running", False, "JobCreated",
                                  f"created Job {builder.job_name(meta.get('name', ''))}", generation, at)
            st["modelUri"] = res.uri
            st["phase"] = "Pending"
            create_uri = res.uri
        elif res.state == "failed":
            conds = set_condition(conds, "InputReady", False, res.reason, res.message, generation, at)
            finish("Failed", res.reason, res.message, succeeded=False)
        else:
            conds = set_condition(conds, "InputReady", False, res.reason, res.message, generation, at)
            st["phase"] = "WaitingForInput"
    else:
        # 3. The Job's progress and outcome.
        jstatus = job.get("status") or {}
        if jstatus.get("startTime"):
            st.setdefault("startTime", jstatus["startTime"])
        st.setdefault("modelUri", ((job.get("metadata") or {}).get("annotations") or {}).get(builder.ANNOTATION_MODEL_URI))
        if st.get("modelUri") is None:
            st.pop("modelUri")
        done = _job_condition(job, "Complete", "SuccessCriteriaMet")
        failed = _job_condition(job, "Failed", "FailureTarget")
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
                st["completionTime"] = jstatus.get("completionTime") or st.get("completionTime") or at
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
            conds = set_condition(conds, "Running", True, "Running", "the quantizer pod is running", generation, at)
            st["phase"] = "Running"
        else:
            suspended = bool((job.get("spec") or {}).get("suspend"))
            reason, msg = (("Queued", "the Job is suspended (queued for admission)") if suspended
                           else ("PodStarting", "waiting for the quantizer pod to start"))
            conds = set_condition(conds, "Running", False, reason, msg, generation, at)
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
    return Decision(status=st, create_with_model_uri=create_uri, events=events)


# --- I/O around the core --------------------------------------------------------------------
_locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    # Handlers run in kopf's thread pool; one reconcile per object at a time keeps a slow
    # read-decide-write from overwriting the outcome of a newer one.
    with _locks_guard:
        return _locks[(namespace, name)]


def reconcile(namespace: str, name: str, job_hint: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Read the QuantizeJob and what it depends on, decide, act, write status. Returns the status."""
    with _lock(namespace, name):
        obj = kube.get(KIND, namespace, name)
        if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
            return None
        status = obj.get("status") or {}
        if status.get("phase") in TERMINAL_PHASES:
            return status
        spec = obj.get("spec") or {}
        job = kube.get("Job", namespace, builder.job_name(name))
        if (job is None and job_hint is not None and _owned_by(job_hint, obj)
                and _job_condition(job_hint, "Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")):
            # The Job may be gone already (ttlSecondsAfterFinished: 0); its last event still
            # shows how it ended, and without it the reconciler would start the work again. A
            # Job deleted before it finished is simply created again.
            job = job_hint
        if job is not None and not _owned_by(job, obj):
            msg = f"Job {builder.job_name(name)} exists and is not owned by this QuantizeJob; delete or rename it"
            log.warning("%s/%s: %s", namespace, name, msg)
            post_event(obj, Event("Warning", "JobConflict", msg))
            raise kopf.TemporaryError(msg, delay=30)
        reference = None
        ref = ((spec.get("model") or {}).get("fineTuneJobRef") or {}).get("name")
        if job is None and ref:
            reference = kube.get("FineTuneJob", namespace, ref)
        pods: list[dict[str, Any]] = []
        if job is not None and _job_condition(job, "Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"):
            uid = (job.get("metadata") or {}).get("uid")
            if uid:
                pods = kube.list_("Pod", namespace, f"batch.kubernetes.io/controller-uid={uid}")
        decision = decide(obj, reference, job, pods)
        if decision.create_with_model_uri:
            parsed = QuantizeJobSpec.model_validate(spec)
            uid = obj["metadata"]["uid"]
            for child in builder.build_children(name, namespace, uid, parsed, decision.create_with_model_uri):
                kube.server_side_apply(child)
            log.info("%s/%s: created Job %s for model %s", namespace, name, builder.job_name(name),
                     decision.create_with_model_uri)
        if decision.status != status:
            kube.patch_merge(KIND, namespace, name, {"status": decision.status}, subresource="status")
            if decision.status.get("phase") != status.get("phase"):
                log.info("%s/%s: phase %s -> %s", namespace, name, status.get("phase"), decision.status.get("phase"))
        for ev in decision.events:
            post_event(obj, ev)
        return decision.status


def _owned_by(child: dict[str, Any], owner: dict[str, Any]) -> bool:
    uid = (owner.get("metadata") or {}).get("uid")
    return any(ref.get("uid") == uid for ref in (child.get("metadata") or {}).get("ownerReferences") or [])


# --- kopf handlers --------------------------------------------------------------------------
@kopf.on.resume(*GROUP_VERSION)
@kopf.on.create(*GROUP_VERSION)
@kopf.on.update(*GROUP_VERSION, field="spec")
def on_spec(name: str, namespace: str, status: Any, body: Any, reason: Any, **_: Any) -> None:
    if status.get("phase") in TERMINAL_PHASES:
        # A finished job stays finished; a spec change does not re-run it.
        log.info("%s/%s is %s; spec changes are ignored (create a new QuantizeJob)", namespace, name, status.get("phase"))
        if reason == "update":
            post_event(dict(body), Event("Warning", "SpecChangeIgnored",
                                    f"the job is {status.get('phase')}; create a new QuantizeJob to run again"))
        return
    if reason == "update" and kube.get("Job", namespace, builder.job_name(name)) is not None:
        # A Job's pod template is immutable and its pod is already working on the old spec.
        post_event(dict(body), Event("Warning", "SpecChangeIgnored",
                                "the quantizer Job has already started; the change applies to a new QuantizeJob"))
    reconcile(namespace, name)


@kopf.on.event("batch", "v1", "jobs", id="quantizejob-child-jobs",
               labels={"app.kubernetes.io/managed-by": builder.common.MANAGED_BY,
                       "app.kubernetes.io/component": builder.COMPONENT})
def on_child_job(body: Any, namespace: str, labels: Any, type: str | None, **_: Any) -> None:
    owner = labels.get(builder.common.owner_label(KIND))
    if owner:
        reconcile(namespace, owner, job_hint=dict(body))


# Last seen (uid, phase, output uri) of each FineTuneJob: fan out only when one changes, not on
# every progress update of a training run.
_seen_inputs: dict[tuple[str, str], tuple[Any, ...]] = {}


@kopf.on.event(*FineTuneJob.resource(), id="quantizejob-inputs")
def on_finetunejob(body: Any, name: str, namespace: str, type: str | None, **_: Any) -> None:
    status = body.get("status") or {}
    key = (namespace, name)
    seen = (type == "DELETED", body.get("metadata", {}).get("uid"), status.get("phase"),
            (status.get("output") or {}).get("uri"))
    if _seen_inputs.get(key) == seen:
        return
    _seen_inputs[key] = seen
    for qj in kube.list_(KIND, namespace):
        ref = (((qj.get("spec") or {}).get("model") or {}).get("fineTuneJobRef") or {}).get("name")
        if ref == name and (qj.get("status") or {}).get("phase") not in TERMINAL_PHASES:
            reconcile(namespace, qj["metadata"]["name"])
