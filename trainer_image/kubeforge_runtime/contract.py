"""The contract between the operator and the workload pods, in one dependency-free module.

The operator (``kubeforge``) renders pods; the runtime (``kubeforge_runtime``) runs in them.
They share nothing but what is written here and in ``trainer_image/CONTRACT.md``: where the
config file is mounted, which environment variables are set, which exit codes mean what,
how the trainer reports progress, how the quantizer reports its result, and when two storage
URIs name one location (``normalize_uri``, ``uris_overlap``: the admission webhook and the
API compare outputs with them, the runtime compares its input and output with them). This module
imports nothing beyond the standard library, so the control plane may import it without
pulling in torch (a test enforces that), and both sides are tested against it.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

# --- files -----------------------------------------------------------------------------
CONFIG_DIR = "/etc/kubeforge"
"""Where the operator mounts the ConfigMap holding the rendered config."""
CONFIG_FILE = "config.json"
"""The config file's name inside CONFIG_DIR; passed to every entry point as --config."""
TERMINATION_LOG = "/dev/termination-log"
"""The quantizer writes its JSON report here; Kubernetes copies it into the pod status."""
WORKSPACE_DIR = "/workspace"
"""An emptyDir for scratch space and caches (the root filesystem is read-only)."""

# --- storage locations -------------------------------------------------------------------
def normalize_uri(uri: str) -> str:
    """One spelling per storage location, so that two URIs can be compared as strings.

    ``file://`` and plain paths become ``file:///abs/path``; ``.``, ``..``, repeated and trailing
    slashes are resolved in every path-like scheme (``file``, ``pvc``, ``s3``) the way the
    runtime's filesystem resolves them; hub ids (``hf://org/name[@rev]``) only lose a trailing
    slash. Symbolic links are not followed (the control plane cannot see the volumes): the
    runtime compares resolved local paths as well.
    """
    scheme, sep, rest = uri.strip().partition("://")
    if not sep:  # a plain path: the runtime reads it as a file path
        scheme, rest = "file", uri.strip()
    scheme = scheme.lower()
    if scheme == "file":
        # file://x/y means /x/y to the runtime; a leading "//" is no different from "/".
        if rest.startswith("/") or sep:
            return "file://" + posixpath.normpath("/" + rest.lstrip("/"))
        return posixpath.normpath(rest)  # relative: only the runtime knows its directory
    if scheme in ("pvc", "s3"):
        location = posixpath.normpath(rest.strip("/")) if rest.strip("/") else ""
        return f"{scheme}://{'' if location == '.' else location}"
    return f"{scheme}://{rest.rstrip('/')}"


def uris_overlap(a: str, b: str) -> bool:
    """Whether two storage URIs name the same location or one lies inside the other
    (compared after :func:`normalize_uri`, by whole path segments)."""
    a, b = normalize_uri(a), normalize_uri(b)

    def inside(child: str, parent: str) -> bool:
        return child.startswith(parent if parent.endswith("/") else parent + "/")

    return a == b or inside(a, b) or inside(b, a)


# --- environment -----------------------------------------------------------------------
ENV_METRICS_PORT = "KUBEFORGE_METRICS_PORT"
"""Port of the trainer's Prometheus endpoint (served by global rank 0)."""
DEFAULT_METRICS_PORT = 9090
ENV_REPORT_PATH = "KUBEFORGE_REPORT_PATH"
"""Override of TERMINATION_LOG for the quantizer's report (local runs, tests)."""
ENV_PVC_ROOT = "KUBEFORGE_PVC_ROOT"
"""Where pvc://claim/path URIs are mounted (a claim at $KUBEFORGE_PVC_ROOT/<claim>)."""
DEFAULT_PVC_ROOT = "/mnt/pvc"
ENV_API_KEY = "KUBEFORGE_API_KEY"
"""The serving API key, injected from the InferenceService's apiKeySecretRef."""
ENV_DATA_QUALITY = "KUBEFORGE_DATA_QUALITY"
"""Set by the FineTuneJob preflight (``launch.py``) for the command it execs when
``dataset.checks`` is set: the passing data measurements as compact JSON (``passed``,
``measurements``, ``thresholds``, ``violations``). The trainer copies it into its result and
the lineage record. The preflight removes any inherited value when there are no checks."""
S3_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
"""Injected from the Secret named by ``spec.storage.s3.credentialsSecretRef`` (``secretKeyRef``,
the same key names in the Secret; the session token optional). boto3 reads them."""
S3_ENV = S3_CREDENTIAL_ENV + ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
"""What ``spec.storage.s3`` sets on workload pods: the credentials, ``endpoint`` as
``AWS_ENDPOINT_URL`` (an S3-compatible store) and ``region`` as ``AWS_DEFAULT_REGION``. With
``storage.s3`` set, ``template.env`` may not set them too."""
ENV_GPU_MEMORY = "KUBEFORGE_GPU_MEMORY"
"""Bytes of one GPU's memory, set on FineTuneJob workers from ``resources.gpuMemory`` (or the
nodeSelector's ``nvidia.com/gpu.memory``) followed by the source in parentheses, e.g.
``85899345920 (resources.gpuMemory 80Gi)``: the preflight's fit check (``fit.py``) compares
its estimate with it once the model's config.json is local, and exits 78 when it does not fit."""
ENV_STAGING_DIR = "KUBEFORGE_STAGING_DIR"
"""Where ``s3://`` outputs and checkpoints are written before they are uploaded (default under
``$HOME``, i.e. the workspace volume)."""
ENV_JOB_NAME = "KUBEFORGE_JOB_NAME"
ENV_NAMESPACE = "KUBEFORGE_NAMESPACE"

# torchrun's own environment (PET_* are torchrun's defaults for its flags), set on workers.
TORCHRUN_ENV = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_RDZV_BACKEND",
    "PET_RDZV_ENDPOINT",
    "PET_RDZV_ID",
    "PET_MAX_RESTARTS",
    "MASTER_ADDR",
    "MASTER_PORT",
)
OPERATOR_ENV = (ENV_JOB_NAME, ENV_NAMESPACE, ENV_METRICS_PORT, ENV_API_KEY)
"""The KUBEFORGE_* variables the operator sets on workload pods (the API key from
apiKeySecretRef, on serving pods only)."""
RESERVED_ENV = TORCHRUN_ENV + OPERATOR_ENV
"""What a pod template's extra ``env`` may not set: the operator's own values would be
silently replaced (Kubernetes keeps the container's last definition)."""
INTERPRETER_ENV = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONINSPECT",
    "PYTHONUSERBASE",
    "PYTHONPLATLIBDIR",
    "PYTHONEXECUTABLE",
    "PYTHONWARNINGS",
    "PYTHONBREAKPOINT",
    "PYTHONPYCACHEPREFIX",
    "BASH_ENV",
    "ENV",
    "GCONV_PATH",
)
"""Variables that change which code the interpreter, the dynamic loader or a shell runs
(a module search path, a startup file, an imported warning category, a loaded charset
converter): a pod template's ``env`` may not set them, nor any name starting with one of
:data:`LOADER_ENV_PREFIXES`. With them a resource could run code the runtime image never
shipped, under the runtime's identity."""
LOADER_ENV_PREFIXES = ("LD_",)
"""glibc's dynamic loader reads every ``LD_*`` variable (``LD_PRELOAD``, ``LD_LIBRARY_PATH``,
``LD_AUDIT``, ...): the whole prefix is refused."""


def interpreter_env(name: str) -> bool:
    """Whether ``name`` is one of :data:`INTERPRETER_ENV` or starts with a :data:`LOADER_ENV_PREFIXES` prefix."""
    return name in INTERPRETER_ENV or name.startswith(LOADER_ENV_PREFIXES)


RENDEZVOUS_PORT = 29400
SERVE_HTTP_PORT = 8000
SERVE_GRPC_PORT = 8001

# --- exit codes --------------------------------------------------------------------------
EXIT_OK = 0
EXIT_CONFIG_ERROR = 78
"""A configuration error (sysexits EX_CONFIG): retrying cannot help, the Job fails at once."""
EXIT_QUALITY_GATE_FAILED = 79
"""The quantized model missed the QuantizeJob's quality gate; its output is kept, rejected."""

# --- progress: Prometheus gauges exported by the trainer's rank 0 ---------------------------
METRIC_STEP = "kubeforge_train_step"
METRIC_TOTAL_STEPS = "kubeforge_train_total_steps"
METRIC_EPOCH = "kubeforge_train_epoch"
METRIC_LOSS = "kubeforge_train_loss"
METRIC_TOKENS_PER_SECOND = "kubeforge_train_tokens_per_second"
METRIC_LEARNING_RATE = "kubeforge_train_learning_rate"
METRIC_MFU = "kubeforge_train_mfu"
METRIC_GRAD_NORM = "kubeforge_train_grad_norm"
METRIC_LAST_CHECKPOINT_STEP = "kubeforge_train_last_checkpoint_step"
METRIC_TASK_METRIC = "kubeforge_train_task_metric"
"""The held-out task metric (FineTuneJob spec.evaluation), label ``stage`` = before | after."""
METRIC_JOB = "kubeforge_train_job"
"""Always 1, labels ``namespace`` and ``name``: the job this trainer works for (from
:data:`ENV_NAMESPACE` and :data:`ENV_JOB_NAME`, which the operator sets). The operator takes
progress only from an endpoint that names the very job it scrapes for: another process that
answers on the pod's IP and port (a local trainer serving every address) is ignored."""

# --- progress: structured log lines -----------------------------------------------------
LOG_EVENT_PREFIX = "KUBEFORGE_EVENT "
"""Rank 0 prints one line per event: this prefix, then a JSON object with an "event" key
("start", "resume", "step", "eval", "taskEval", "checkpoint", "stopped", "done"); "step" carries step,
totalSteps, epoch, loss, tokensPerSecond, learningRate; "taskEval" carries stage (before | after), metric,
value, samples. `kubeforge run` draws its progress bar from these."""

DATA_QUALITY_REPORT_KIND = "DataQualityReport"
"""When a data red line (``dataset.checks``) is crossed, the preflight exits EXIT_CONFIG_ERROR and
writes ``{"kind": DATA_QUALITY_REPORT_KIND, "message": ..., "passed": false, "measurements": ...,
"thresholds": ..., "violations": [...]}`` (compact JSON, under 4 KiB) to the termination log; the
operator fails the FineTuneJob with reason ``DataQualityFailed`` and copies the rest into
``status.result.dataQuality``."""

RESULT_KIND = "FineTuneJobResult"
"""The trainer's rank 0 writes ``{"kind": RESULT_KIND, ...}`` (compact JSON, under 4 KiB) to the
termination log when it finishes: steps, losses, the task metric before and after. The
operator copies it into the FineTuneJob's ``status.result``."""


def data_quality_from_env() -> dict[str, object] | None:
    """The preflight's data measurements (:data:`ENV_DATA_QUALITY`), or None."""
    raw = os.environ.get(ENV_DATA_QUALITY)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def termination_log_path() -> Path | None:
    """Where a workload writes the message Kubernetes shows in the pod's status, if anywhere.

    ``$KUBEFORGE_REPORT_PATH`` when set (local runs, tests); else the kubelet's
    ``/dev/termination-log`` when it exists (in a pod); else nowhere: outside a pod nothing
    may create files under ``/dev``.
    """
    override = os.environ.get(ENV_REPORT_PATH)
    if override:
        return Path(override)
    default = Path(TERMINATION_LOG)
    return default if default.exists() else None
