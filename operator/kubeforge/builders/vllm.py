"""The vLLM pod of an InferenceService with ``spec.engine.backend: vllm``. Pure.

Called by :func:`kubeforge.builders.inference.build_deployment`, which keeps everything around
the pod (Deployment, Service, HPA, PDB, annotations that roll the pods) the same for both
engines. The pod:

* an init container ``fetch-model`` in the KubeForge runtime image runs
  ``python -m kubeforge_runtime.fetch`` (:mod:`kubeforge_runtime.fetch`): the model and every
  adapter are resolved by the runtime's own storage code (``pvc://`` mounted, ``s3://`` and
  ``hf://`` downloaded with the spec's storage credentials) and linked under
  :data:`MODELS_DIR` in the pod's workspace, so vLLM only ever reads local directories;
* the container ``server`` runs vLLM's OpenAI server from the vLLM image
  (``KUBEFORGE_VLLM_IMAGE``, set by the chart's ``vllmImage``; ``spec.template.image``
  overrides it where the workload policy allows): ``python3 -m
  vllm.entrypoints.openai.api_server`` with ``--served-model-name <name>``, ``--dtype``,
  ``--max-num-seqs`` (``maxConcurrentRequests``), ``--max-num-batched-tokens``
  (``maxBatchTokens``), ``--enable-prefix-caching`` or ``--no-enable-prefix-caching``
  (``prefixCaching``), ``--max-model-len``, :data:`EAGER_ARGS` for ``compile: off``, ``--enable-lora --lora-modules name=path`` per
  adapter and ``--tensor-parallel-size`` = ``resources.gpus`` when more than one. The API
  key reaches vLLM as ``VLLM_API_KEY`` from the Secret (never an argument: arguments are
  visible in the pod spec and the process table);
* probes on vLLM's ``/health``: a startup probe allowing :data:`STARTUP_BUDGET_S` for
  imports, the weights and CUDA graph capture, then readiness and liveness;
* the same restricted-Pod-Security hardening as every KubeForge pod; vLLM's caches go to the
  workspace emptyDir, and ``/dev/shm`` is a memory-backed emptyDir (tensor-parallel workers
  talk through shared memory; the read-only root filesystem would stop them).
"""

from __future__ import annotations

import os
from typing import Any

from kubeforge_runtime import contract

from ..api.inference import InferenceServiceSpec
from . import common

VLLM_VERSION = "0.32.0"
DEFAULT_VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
"""vLLM's official OpenAI server image, pinned; the chart's ``vllmImage`` sets the real location."""
VLLM_IMAGE_ENV = "KUBEFORGE_VLLM_IMAGE"
ENTRY = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
MODELS_DIR = f"{contract.WORKSPACE_DIR}/models"
"""Where ``fetch-model`` links the model (``base``) and each adapter (its name)."""
BASE_LINK = "base"
SHM_VOLUME = "dshm"
STARTUP_PERIOD_S, STARTUP_FAILURES = 10, 180
STARTUP_BUDGET_S = STARTUP_PERIOD_S * STARTUP_FAILURES
"""30 minutes for vLLM to load the weights (and capture CUDA graphs) before liveness counts."""
API_KEY_ENV = "VLLM_API_KEY"
EAGER_ARGS = ["--enforce-eager", "--optimization-level", "0"]
"""``engine.compile: off``: vLLM without torch.compile and CUDA graphs (``--enforce-eager``) and
without its other start-up optimisations (level O0, "just starting up immediately")."""

# Which QuantizeJob outputs vLLM loads (README "Serving on vLLM"). fp16/bf16 outputs are
# plain checkpoints in that dtype. int8-weight-only is the case vLLM's TorchAO page documents
# (a transformers TorchAoConfig(Int8WeightOnlyConfig()) checkpoint, read through vLLM's
# torchao quantization method; the vLLM image needs torchao installed). int8-dynamic is a
# torchao activation-quantizing config vLLM's documentation does not cover, and the
# int4-weight-only CPU output is a pickled tensor class that only KubeForge's runtime
# registers (kubeforge_runtime/quantize/methods.py): both are refused.
VLLM_QUANTIZE_METHODS = ("fp16", "bf16", "int8-weight-only")


def vllm_quantize_problem(job_spec: dict[str, Any] | None) -> str | None:
    """Why vLLM cannot serve the output of a QuantizeJob with this spec (camelCase, as stored),
    or None. int8 and int4 also quantize the embedding and lm_head by default
    (``quantizeEmbeddings``) through operators only KubeForge's runtime registers
    (kubeforge_runtime/quantize/embeddings.py), so vLLM needs ``quantizeEmbeddings: false``."""
    method = (job_spec or {}).get("method")
    if method is None:
        return None
    if method not in VLLM_QUANTIZE_METHODS:
        return (f"engine.backend: vllm cannot load a {method} QuantizeJob output; quantize with "
                f"{', '.join(VLLM_QUANTIZE_METHODS)} (int8-weight-only with quantizeEmbeddings: false loads "
                f"through vLLM's torchao support), or use engine.backend: kubeforge")
    if method.startswith("int") and (job_spec or {}).get("quantizeEmbeddings", True):
        return (f"engine.backend: vllm cannot load a {method} output whose embedding is quantized too: set "
                f"quantizeEmbeddings: false on the QuantizeJob, or use engine.backend: kubeforge")
    return None


def vllm_image() -> str:
    return os.environ.get(VLLM_IMAGE_ENV, DEFAULT_VLLM_IMAGE)


def _local_uri(uri: str) -> bool:
    return uri.startswith(("pvc://", "file://"))


def fetch_args(model_uri: str, spec: InferenceServiceSpec) -> list[str]:
    """The ``name=uri`` pairs the fetch step resolves (``base`` for the model)."""
    return [f"{BASE_LINK}={model_uri}", *(f"{a.name}={a.uri}" for a in spec.adapters)]


def server_args(name: str, spec: InferenceServiceSpec, port: int) -> list[str]:
    """vLLM's command-line flags for ``spec`` (paths under :data:`MODELS_DIR`)."""
    engine = spec.engine
    args = [
        "--model", f"{MODELS_DIR}/{BASE_LINK}",
        "--served-model-name", name,
        "--host", "0.0.0.0",
        "--port", str(port),
        "--dtype", engine.dtype,
        "--max-num-seqs", str(engine.max_concurrent_requests),
        "--max-num-batched-tokens", str(engine.max_batch_tokens),
        "--enable-prefix-caching" if engine.prefix_caching else "--no-enable-prefix-caching",
    ]
    if engine.max_model_length is not None:
        args += ["--max-model-len", str(engine.max_model_length)]
    if engine.compile == "off":
        args += EAGER_ARGS
    if spec.adapters:
        args += ["--enable-lora", "--max-loras", str(len(spec.adapters)), "--lora-modules",
                 *(f"{a.name}={MODELS_DIR}/{a.name}" for a in spec.adapters)]
    if spec.resources.gpus > 1:
        args += ["--tensor-parallel-size", str(spec.resources.gpus)]
    return args


def _probe(period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": timeout}


def server_env(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "VLLM_CACHE_ROOT", "value": f"{contract.WORKSPACE_DIR}/vllm"},
        {"name": "XDG_CACHE_HOME", "value": f"{contract.WORKSPACE_DIR}/cache"},
        # Models are local directories already (fetch-model): vLLM never reaches the hub.
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
    ]
    if spec.api_key_secret_ref is not None:
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": spec.api_key_secret_ref.name, "key": spec.api_key_secret_ref.key}}})
    return env


def containers(name: str, spec: InferenceServiceSpec, model_uri: str, base_env: list[dict[str, Any]],
               mounts: list[dict[str, Any]], port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``server`` container before :func:`common.workload_pod_spec` hardens it, the
    ``fetch-model`` init container, hardened here)."""
    fetch = {
        "name": "fetch-model",
        # Always the platform's runtime image: it carries KubeForge's storage code.
        "image": os.environ.get(common.IMAGE_ENV, common.DEFAULT_IMAGE),
        "command": ["python", "-m", "kubeforge_runtime.fetch", "--into", MODELS_DIR, *fetch_args(model_uri, spec)],
        "env": [*base_env, {"name": "KUBEFORGE_CACHE_DIR", "value": f"{contract.WORKSPACE_DIR}/downloads"}],
        "securityContext": common.container_security_context(),
        "volumeMounts": [{"name": common.WORKSPACE_VOLUME, "mountPath": contract.WORKSPACE_DIR}, *mounts],
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    server = {
        "name": "server",
        "command": list(ENTRY),
        "args": server_args(name, spec, port),
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": [*base_env, *server_env(spec)],
        "resources": common.container_resources(spec.resources),
        "volumeMounts": [*mounts, {"name": SHM_VOLUME, "mountPath": "/dev/shm"}],
        "startupProbe": _probe(STARTUP_PERIOD_S, STARTUP_FAILURES, 5),
        "readinessProbe": _probe(5, 3, 5),
        "livenessProbe": _probe(10, 6, 10),
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return server, fetch


def shm_volume() -> dict[str, Any]:
    return {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}
