"""FineTuneJob -> child manifests: headless Service, ConfigMap, Indexed batch/v1 Job, data gate.

Pure functions, no I/O: called by :mod:`kubeforge.controllers.finetune` (which applies the
result by server-side apply) and by the unit tests (golden manifests). Same spec in, same
manifests out, so applying twice changes nothing.

What the workers look like (the pod side of ``trainer_image/CONTRACT.md``):

* one pod per node, as an Indexed Job with ``completions = parallelism = nodes.max``; the
  Job controller recreates failed pods, counts back-off and garbage-collects, and Kueue can
  admit the Job like any other;
* the headless Service (named like the Job) plus ``subdomain`` gives the index-0 pod the
  stable DNS name ``<job>-0.<job>``, the one name the workers resolve (:func:`service`);
  that pod hosts the c10d rendezvous store, which is why the Service publishes not-ready
  addresses (the rendezvous runs before readiness);
* the container runs the preflight ``kubeforge_runtime.launch`` (exit 78 on a bad config),
  which execs ``torchrun`` with elastic ``--nnodes=min:max`` rendezvous and ``--max-restarts``;
  the ``PET_*`` variables torchrun scripts already expect are set too;
* the podFailurePolicy ignores disruptions (preemption, eviction, node drain: the pod gets
  the ``DisruptionTarget`` condition) so they do not count against ``backoffLimit``, and
  fails the Job at once on the configuration-error exit code.

With ``spec.dataset.checks`` the controller first applies only :func:`gate_children`: the
ConfigMap and the data gate, a one-pod Job ``<name>-datacheck`` (no GPU, small CPU and memory
requests, the workers' image, security context, S3 credentials, volumes and pod template
overrides) that runs ``kubeforge_runtime.launch --data-check``. Its pods carry the job's
selector labels, so the workers' NetworkPolicy covers them too. The workers (:func:`build`)
come only once it has passed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kubeforge_runtime import contract

from ..api.finetune import FineTuneJob, FineTuneJobSpec
from . import common

KIND = FineTuneJob.kind
CONTAINER = "trainer"
COMPONENT = "trainer"
MASTER_PORT = 29500
"""torch's default MASTER_PORT, for scripts that read it; distinct from the rendezvous port
so that a script opening its own store on MASTER_PORT never collides with torchrun's c10d
store on RENDEZVOUS_PORT in pod 0."""
TERMINATION_GRACE_SECONDS = 120
"""Time between SIGTERM and SIGKILL: the trainer saves a checkpoint on SIGTERM (suspend,
preemption, drain), which for a large model takes a while."""
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
"""The Job controller labels each pod of an Indexed Job with its index too (Kubernetes 1.28+)."""

MAX_NAME_LENGTH = 52
"""The CRD's own limit (a CEL rule on metadata.name, shared by every kind); checked here too
because worker pods get the host name ``<name>-<index>`` (63 characters at most) and the
Service is named ``<name>`` (a DNS-1035 label), whatever CRD version is installed."""
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a FineTuneJob's children, or None when it can.

    The CRD accepts any DNS subdomain name, but the Service and the pods' host names are
    DNS-1035 labels; the message says what to change.
    """
    if len(name) > MAX_NAME_LENGTH:
        return (f"metadata.name is {len(name)} characters; a FineTuneJob name can have at most "
                f"{MAX_NAME_LENGTH} (its worker pods are reached as <name>-<index>.<name>)")
    if not _NAME_RE.match(name):
        return ("metadata.name must start with a letter and contain only lower-case letters, digits and '-' "
                "(no dots): it names the workers' headless Service")
    return None


@dataclass(frozen=True)
class Names:
    """Deterministic names of a FineTuneJob's children."""

    job: str
    service: str
    config_map: str
    datacheck: str
    """The data gate's Job (``spec.dataset.checks``): at most 52 + 10 characters, a valid label."""

    @classmethod
    def of(cls, name: str) -> "Names":
        # The Service must be named exactly like the pods' subdomain, and the pods' host
        # names are <job>-<index>, so Job and Service share the FineTuneJob's name.
        return cls(job=name, service=name, config_map=f"{name}-config", datacheck=f"{name}-datacheck")


def rendezvous_endpoint(name: str) -> str:
    n = Names.of(name)
    return f"{n.job}-0.{n.service}:{contract.RENDEZVOUS_PORT}"


def checkpoint_uri(spec: FineTuneJobSpec) -> str:
    """Where checkpoints go: checkpoint.uri, else <output.uri>/checkpoints (the trainer's default)."""
    return spec.checkpoint.uri or f"{spec.output.uri.rstrip('/')}/checkpoints"


# --- the trainer config ----------------------------------------------------------------------

_CONFIG_FIELDS = ("model", "dataset", "method", "lora", "parallelism", "training", "checkpoint", "output", "evaluation")


def teacher_uri(spec: FineTuneJobSpec, resolved: str | None = None) -> str | None:
    """The teacher's URI: ``distillation.teacher.uri``, or ``resolved`` (the output of its
    ``fineTuneJobRef``, which the controller resolves); None without distillation."""
    if spec.distillation is None:
        return None
    uri = spec.distillation.teacher.uri or resolved
    if uri is None:
        raise ValueError("distillation.teacher.fineTuneJobRef is not resolved yet; the controller waits for it")
    return uri


def render_config(name: str, namespace: str, spec: FineTuneJobSpec, teacher: str | None = None) -> dict[str, Any]:
    """The trainer's config: the training-relevant subset of the spec, camelCase, every default
    written out (the trainer's own defaults are not the API's, so nothing is left implicit);
    unset optional values (validationUri, maxSteps, checkpoint.uri) are omitted. A teacher is
    written as a URI (``teacher``: a fineTuneJobRef's resolved output)."""
    body = spec.model_dump(by_alias=True, exclude_none=True, mode="json", include=set(_CONFIG_FIELDS))
    if spec.distillation is not None:
        d = spec.distillation
        body["distillation"] = {"teacher": {"uri": teacher_uri(spec, teacher)}, "temperature": d.temperature,
                                "alpha": d.alpha}
    return {"kind": KIND, "name": name, "namespace": namespace, **body}


def config_map(name: str, namespace: str, uid: str, spec: FineTuneJobSpec, teacher: str | None = None) -> dict[str, Any]:
    owner = common.owner_reference(KIND, name, uid)
    return common.config_map(Names.of(name).config_map, namespace, owner,
                             common.labels(KIND, name, "config"), render_config(name, namespace, spec, teacher))


# --- the headless Service ----------------------------------------------------------------------

RANK0_SELECTOR = {COMPLETION_INDEX_LABEL: "0"}
"""The Service selects only the index-0 worker. Its name ``<job>-0.<job>`` is the one the
workers resolve: the rendezvous endpoint and ``MASTER_ADDR``, and the address the rendezvous'
rank 0 publishes for the workers' store, which is that same pod (torch's c10d rendezvous ranks
its nodes by host name, and ``<job>-0.`` sorts first; the pod that hosts the rendezvous store is
always one of them). The other pods keep their host names and FQDNs in their own
``/etc/hosts``, but get no DNS record: nothing looks them up (NCCL and gloo exchange
addresses through the store). Selecting one pod instead of all leaves the endpoint
controllers one pod's changes to publish, not every worker's (their writes per job: README
"Operator at scale")."""


def service(name: str, namespace: str, uid: str) -> dict[str, Any]:
    owner = common.owner_reference(KIND, name, uid)
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": common.metadata(Names.of(name).service, namespace, owner, common.labels(KIND, name, "rendezvous")),
        "spec": {
            "clusterIP": "None",
            # The rendezvous happens before any worker is ready, so DNS must answer for
            # not-ready pods too.
            "publishNotReadyAddresses": True,
            "selector": {**common.selector_labels(KIND, name), **RANK0_SELECTOR},
            "ports": [{"name": "rendezvous", "port": contract.RENDEZVOUS_PORT,
                       "targetPort": contract.RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


# --- the Indexed Job ----------------------------------------------------------------------------

def torchrun_args(name: str, uid: str, spec: FineTuneJobSpec) -> list[str]:
    config_path = f"{contract.CONFIG_DIR}/{contract.CONFIG_FILE}"
    return [
        "python", "-m", "kubeforge_runtime.launch", "--config", config_path, "--",
        "torchrun",
        f"--nnodes={spec.nodes.min}:{spec.nodes.max}",
        f"--nproc-per-node={spec.effective_procs_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rendezvous_endpoint(name)}",
        f"--rdzv-id={uid}",
        f"--max-restarts={spec.max_restarts}",
        "-m", "kubeforge_runtime.train", "--config", config_path,
    ]


def worker_env(name: str, namespace: str, uid: str, spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    n = Names.of(name)
    return [
        *common.base_env(KIND, name, namespace),
        {"name": "PET_NNODES", "value": f"{spec.nodes.min}:{spec.nodes.max}"},
        {"name": "PET_NPROC_PER_NODE", "value": str(spec.effective_procs_per_node)},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
        {"name": "PET_RDZV_BACKEND", "value": "c10d"},
        {"name": "PET_RDZV_ENDPOINT", "value": rendezvous_endpoint(name)},
        {"name": "PET_RDZV_ID", "value": uid},
        {"name": "PET_MAX_RESTARTS", "value": str(spec.max_restarts)},
        {"name": "MASTER_ADDR", "value": f"{n.job}-0.{n.service}"},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": contract.ENV_METRICS_PORT, "value": str(contract.DEFAULT_METRICS_PORT)},
        *common.storage_env(spec.storage),
        *gpu_memory_env(spec),
    ]


def gpu_memory_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """``$KUBEFORGE_GPU_MEMORY`` for the preflight's fit check, when the spec gives a limit."""
    from .. import fit

    limit = fit.gpu_limit(spec.to_api())
    return [{"name": contract.ENV_GPU_MEMORY, "value": f"{limit[0]} ({limit[1]})"}] if limit else []


def pod_failure_policy() -> dict[str, Any]:
    return {"rules": [
        # A configuration error cannot be fixed by retrying: fail the whole Job at once.
        {"action": "FailJob",
         "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [contract.EXIT_CONFIG_ERROR]}},
        # Preemption, eviction, node drain: not the job's fault, so not counted against
        # backoffLimit; the Job controller just creates a replacement pod.
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def job(name: str, namespace: str, uid: str, spec: FineTuneJobSpec, teacher: str | None = None) -> dict[str, Any]:
    n = Names.of(name)
    owner = common.owner_reference(KIND, name, uid)
    lbls = common.labels(KIND, name, COMPONENT)
    tmpl = spec.template

    pvc_vols, pvc_mounts = common.pvc_volumes([
        spec.model.uri, spec.dataset.uri, spec.dataset.validation_uri, spec.checkpoint.uri, spec.output.uri,
        spec.evaluation.uri if spec.evaluation else None, teacher_uri(spec, teacher),
    ])
    container: dict[str, Any] = {
        "name": CONTAINER,
        "command": torchrun_args(name, uid, spec),
        "env": worker_env(name, namespace, uid, spec),
        "ports": [
            {"name": "rendezvous", "containerPort": contract.RENDEZVOUS_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": contract.DEFAULT_METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": common.container_resources(spec.resources),
        # launch.py writes why it refused the config to the termination log; the last log
        # lines stand in when a crash left it empty. The operator quotes it in status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [*pvc_mounts, {"name": common.SHM_VOLUME, "mountPath": "/dev/shm"}],
    }
    pod_spec = common.workload_pod_spec(
        container=container,
        config_map_name=n.config_map,
        template=tmpl,
        restart_policy="Never",  # required by podFailurePolicy; the Job controller replaces pods
        # NCCL and data loader workers need more shared memory than the runtime's 64 MiB default.
        extra_volumes=[*pvc_vols, common.shared_memory_volume(spec.resources)],
        termination_grace_period_seconds=TERMINATION_GRACE_SECONDS,
        resources=spec.resources,
    )
    pod_spec["subdomain"] = n.service
    pod_meta = common.pod_template_metadata(lbls, tmpl, {"kubectl.kubernetes.io/default-container": CONTAINER})

    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.nodes.max,
        "parallelism": spec.nodes.max,
        "backoffLimit": spec.backoff_limit,
        "podFailurePolicy": pod_failure_policy(),
        # Never two pods with the same index at once (they would both claim one node rank
        # and host name): a replacement starts only once the old pod has fully terminated.
        "podReplacementPolicy": "Failed",
        "template": {"metadata": pod_meta, "spec": pod_spec},
    }
    if spec.nodes.min < spec.nodes.max:
        # Elastic: training may finish on as few as nodes.min pods while the others never got
        # scheduled; the Job succeeds once that many workers succeeded (the rest are stopped).
        job_spec["successPolicy"] = {"rules": [{"succeededCount": spec.nodes.min}]}
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.suspend:
        job_spec["suspend"] = True
    elif KUEUE_QUEUE_LABEL not in tmpl.labels:
        job_spec["suspend"] = False
    # else: queued by Kueue, whose webhook suspends the Job on creation and which unsuspends
    # it on admission; owning spec.suspend here would fight it, so the field is left out.

    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": common.metadata(n.job, namespace, owner, {**tmpl.labels, **lbls}),
        "spec": job_spec,
    }


# --- the data gate (spec.dataset.checks) -----------------------------------------------------

DATACHECK_CONTAINER = "datacheck"
DATACHECK_COMPONENT = "datacheck"
DATACHECK_RESOURCES: dict[str, Any] = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
"""The gate parses and measures one JSONL file (and loads a tokenizer for maxOverlongShare):
a fraction of a core and a little memory, never a GPU. The memory limit bounds a runaway
parse; a training file of more than a few hundred MB needs more (an OOM-killed gate fails the
FineTuneJob with reason DataCheckFailed naming exit code 137)."""
DATACHECK_BACKOFF_LIMIT = 2
"""Retries of a gate pod that failed other than by a crossed line (exit 1: a download that
failed after its own retries). Exit 78 fails the gate at once (podFailurePolicy)."""


def needs_data_gate(spec: FineTuneJobSpec) -> bool:
    """Whether ``spec.dataset.checks`` sets any red line. The CRD defaults ``checks`` to ``{}``
    (every optional object gets its defaults), so "set" means a threshold, not the object."""
    checks = spec.dataset.checks
    return checks is not None and any(v is not None for v in checks.model_dump().values())


def datacheck_job(name: str, namespace: str, uid: str, spec: FineTuneJobSpec) -> dict[str, Any]:
    """The data gate: one pod running ``launch --data-check`` on the workers' config."""
    n = Names.of(name)
    owner = common.owner_reference(KIND, name, uid)
    lbls = common.labels(KIND, name, DATACHECK_COMPONENT)
    tmpl = spec.template
    # Only what the gate reads: the training file, and the model for maxOverlongShare's tokenizer.
    pvc_vols, pvc_mounts = common.pvc_volumes([spec.model.uri, spec.dataset.uri])
    container: dict[str, Any] = {
        "name": DATACHECK_CONTAINER,
        "command": ["python", "-m", "kubeforge_runtime.launch", "--config",
                    f"{contract.CONFIG_DIR}/{contract.CONFIG_FILE}", "--data-check"],
        "env": [*common.base_env(KIND, name, namespace), *common.storage_env(spec.storage)],
        "resources": {k: dict(v) for k, v in DATACHECK_RESOURCES.items()},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": pvc_mounts,
    }
    pod_spec = common.workload_pod_spec(container=container, config_map_name=n.config_map, template=tmpl,
                                        restart_policy="Never", extra_volumes=pvc_vols)
    # A queue label would make Kueue admit the gate as a workload of its own: the gate is not
    # what the queue's quota is for, so it is left off the gate's labels.
    pod_labels = {k: v for k, v in tmpl.labels.items() if k != KUEUE_QUEUE_LABEL}
    pod_meta = common.pod_template_metadata(lbls, tmpl.model_copy(update={"labels": pod_labels}),
                                            {"kubectl.kubernetes.io/default-container": DATACHECK_CONTAINER})
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": common.metadata(n.datacheck, namespace, owner, lbls),
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": DATACHECK_BACKOFF_LIMIT,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": DATACHECK_CONTAINER, "operator": "In",
                                                      "values": [contract.EXIT_CONFIG_ERROR]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "podReplacementPolicy": "Failed",
            # spec.suspend holds the gate too: a suspended job runs no pod at all.
            "suspend": spec.suspend,
            "template": {"metadata": pod_meta, "spec": pod_spec},
        },
    }


def gate_children(name: str, namespace: str, uid: str, spec: FineTuneJobSpec,
                  teacher: str | None = None) -> list[dict[str, Any]]:
    """What a job with ``spec.dataset.checks`` gets before its gate has passed: the ConfigMap
    (the gate reads the workers' config) and the gate Job; no Service, no worker Job."""
    return [config_map(name, namespace, uid, spec, teacher), datacheck_job(name, namespace, uid, spec)]


def build(name: str, namespace: str, uid: str, spec: FineTuneJobSpec, teacher: str | None = None) -> list[dict[str, Any]]:
    """All children, in the order they should be applied (the Job last: its pods mount the
    ConfigMap and resolve each other through the Service). ``teacher``: the resolved output of
    ``distillation.teacher.fineTuneJobRef`` (not needed for a teacher given by URI)."""
    return [service(name, namespace, uid), config_map(name, namespace, uid, spec, teacher),
            job(name, namespace, uid, spec, teacher)]
