"""InferenceService children: serve config, Deployment, Service, HPA and PodDisruptionBudget.

Called by :mod:`kubeforge.controllers.inference` once the model to serve is known (a URI from
the spec, or the output of the referenced FineTuneJob / QuantizeJob). Pure: ``spec -> manifests``.

* **Deployment** ``<name>``: pods run ``python -m kubeforge_runtime.serve --config
  /etc/kubeforge/config.json`` (``trainer_image/kubeforge_runtime/serve/config.py`` parses the
  config). A *startup* probe on ``/health`` holds off liveness while the process starts and
  loads the model; *readiness* is ``/ready``, which the server answers 200 only once every
  model is loaded and warmed up, so no request reaches a cold replica; *liveness* is
  ``/health``. The pod template carries the model URI, its revision and a hash of the
  config as annotations: a new output of the referenced job (or any config change) changes
  the template, and the Deployment rolls the pods, one surge pod at a time
  (``maxUnavailable: 0`` keeps serving capacity during the roll).
* **Service** ``<name>``: ``http`` 8000 (OpenAI API) and ``grpc`` 8001; the in-cluster URL is
  ``http://<name>.<namespace>.svc:8000/v1``.
* **HorizontalPodAutoscaler** ``<name>`` (``autoscaling/v2``), only when ``replicas.max >
  replicas.min``: a ``Pods`` metric, the per-pod average of a serving gauge.
* **PodDisruptionBudget** ``<name>``: at most one replica voluntarily disrupted at a time.

Autoscaling metrics. The server exports vLLM's names: ``concurrency`` ->
``vllm:num_requests_running``, ``queueDepth`` -> ``vllm:num_requests_waiting``,
``kvCacheUsage`` -> ``vllm:kv_cache_usage_perc`` (a 0-1 fraction). The HPA reads per-pod
metrics from the custom metrics API, usually served by the Prometheus adapter, and the
names there are what the adapter's rules make of the series names. Colons are legal in
Prometheus names but awkward in the custom metrics API paths and in adapter configs, so
KubeForge follows the convention of vLLM's own production stack and expects the adapter to
expose ``vllm:<x>`` as ``vllm_<x>`` (:data:`ADAPTER_METRIC_NAMES`). A prometheus-adapter
rule that does this::

    rules:
    - seriesQuery: '{__name__=~"^vllm:(num_requests_running|num_requests_waiting|kv_cache_usage_perc)$",namespace!="",pod!=""}'
      resources: {overrides: {namespace: {resource: namespace}, pod: {resource: pod}}}
      name: {matches: "^vllm:(.*)$", as: "vllm_${1}"}
      metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)'

Scale to zero needs the ``HPAScaleToZero`` feature gate, so an autoscaled service with
``replicas.min: 0`` keeps at least one replica (``minReplicas: 1``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from kubeforge_runtime import contract

from ..api.inference import InferenceServiceSpec
from . import common, vllm
from .names import child_name

KIND = "InferenceService"
COMPONENT = "inference-server"
CONTAINER_NAME = "server"
COMMAND = ["python", "-m", "kubeforge_runtime.serve", "--config", f"{contract.CONFIG_DIR}/{contract.CONFIG_FILE}"]
HTTP_PORT = contract.SERVE_HTTP_PORT
GRPC_PORT = contract.SERVE_GRPC_PORT
ANNOTATION_MODEL_URI = "kubeforge.io/model-uri"
ANNOTATION_MODEL_REVISION = "kubeforge.io/model-revision"
ANNOTATION_CONFIG_HASH = "kubeforge.io/config-hash"

PROMETHEUS_METRIC_NAMES = {
    "concurrency": "vllm:num_requests_running",
    "queueDepth": "vllm:num_requests_waiting",
    "kvCacheUsage": "vllm:kv_cache_usage_perc",
}
"""The series the server exports for each autoscaling metric."""
ADAPTER_METRIC_NAMES = {k: v.replace(":", "_") for k, v in PROMETHEUS_METRIC_NAMES.items()}
"""The names the HPA asks the custom metrics API for (see the module docstring)."""

# Probe timings. Startup: up to 10 minutes for the process to serve HTTP (imports, CUDA
# init); the model then loads behind a failing readiness probe, never a failing liveness one.
STARTUP_PERIOD_S, STARTUP_FAILURES = 5, 120
READINESS_PERIOD_S, READINESS_FAILURES = 5, 3
LIVENESS_PERIOD_S, LIVENESS_FAILURES = 10, 6
PROGRESS_DEADLINE_S = 1800
"""A rollout with no progress this long marks the Deployment ProgressDeadlineExceeded
(reported as ModelLoadFailed): loading large weights can take many minutes."""


@dataclass(frozen=True)
class ModelRef:
    """The resolved model to serve."""

    uri: str
    revision: str


def url(name: str, namespace: str) -> str:
    """The in-cluster base URL of the OpenAI-compatible API."""
    return f"http://{name}.{namespace}.svc:{HTTP_PORT}/v1"


def config_map_name(name: str) -> str:
    return child_name(name, "serve-config", 253)


def autoscaled(spec: InferenceServiceSpec) -> bool:
    return spec.replicas.max > spec.replicas.min


def hpa_bounds(spec: InferenceServiceSpec) -> tuple[int, int]:
    """(minReplicas, maxReplicas) of the HPA; minReplicas is at least 1 (see the module docstring)."""
    return max(spec.replicas.min, 1), spec.replicas.max


def desired_replicas(spec: InferenceServiceSpec, current: int | None) -> int:
    """``spec.replicas`` of the Deployment.

    Fixed size: ``replicas.min``. Autoscaled: the Deployment's current size clamped to the
    HPA's range, so that re-applying the Deployment never undoes the HPA's last decision (and
    a brand-new Deployment starts at the minimum).
    """
    if not autoscaled(spec):
        return spec.replicas.min
    low, high = hpa_bounds(spec)
    return min(max(current if current is not None else low, low), high)


_CONFIG_FIELDS = {"adapters", "engine"}
"""The spec's parts the server reads, unchanged in shape (``kubeforge_runtime.serve.config``)."""


def serve_config(name: str, namespace: str, spec: InferenceServiceSpec, model: ModelRef) -> dict[str, Any]:
    """The JSON the server reads, exactly the shape ``kubeforge_runtime.serve.config`` parses: the
    spec's ``engine`` and ``adapters`` as they are (every default written out, nulls kept), the
    resolved model, and the names and ports the operator decides."""
    body = spec.model_dump(by_alias=True, mode="json", include=_CONFIG_FIELDS)
    return {
        "kind": KIND,
        "name": name,
        "namespace": namespace,
        "servedModelName": name,
        "model": {"uri": model.uri},
        **body,
        "port": HTTP_PORT,
        "grpcPort": GRPC_PORT,
    }


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _owner(name: str, uid: str) -> dict[str, Any]:
    return common.owner_reference(KIND, name, uid)


def _labels(name: str, spec: InferenceServiceSpec | None = None) -> dict[str, str]:
    extra = spec.template.labels if spec is not None else {}
    return {**extra, **common.labels(KIND, name, COMPONENT)}


def build_config_map(name: str, namespace: str, uid: str, spec: InferenceServiceSpec, model: ModelRef) -> dict[str, Any]:
    return common.config_map(config_map_name(name), namespace, _owner(name, uid), _labels(name),
                             serve_config(name, namespace, spec, model))


def _http_probe(path: str, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": timeout}


def _kubeforge_container(spec: InferenceServiceSpec, base_env: list[dict[str, Any]],
                         mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """The KubeForge server container (before :func:`common.workload_pod_spec` hardens it)."""
    env = list(base_env)
    if spec.api_key_secret_ref is not None:
        # By reference only: the key never appears in the Deployment or the ConfigMap.
        env.append({"name": contract.ENV_API_KEY, "valueFrom": {"secretKeyRef": {
            "name": spec.api_key_secret_ref.name, "key": spec.api_key_secret_ref.key}}})
    return {
        "name": CONTAINER_NAME,
        "command": list(COMMAND),
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": common.container_resources(spec.resources),
        "volumeMounts": mounts,
        "startupProbe": _http_probe("/health", STARTUP_PERIOD_S, STARTUP_FAILURES, 2),
        "readinessProbe": _http_probe("/ready", READINESS_PERIOD_S, READINESS_FAILURES, 2),
        "livenessProbe": _http_probe("/health", LIVENESS_PERIOD_S, LIVENESS_FAILURES, 5),
        # A model that fails to load says why in the pod status (ModelLoadFailed).
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def build_deployment(name: str, namespace: str, uid: str, spec: InferenceServiceSpec, model: ModelRef,
                     current_replicas: int | None = None) -> dict[str, Any]:
    config = serve_config(name, namespace, spec, model)
    volumes, mounts = common.pvc_volumes([model.uri, *(a.uri for a in spec.adapters)])
    base_env = [*common.base_env(KIND, name, namespace), *common.storage_env(spec.storage)]
    init_containers: list[dict[str, Any]] = []
    if spec.engine.backend == "vllm":
        container, fetch = vllm.containers(name, spec, model.uri, base_env, mounts, HTTP_PORT)
        init_containers.append(fetch)
        volumes = [*volumes, vllm.shm_volume()]
    else:
        container = _kubeforge_container(spec, base_env, mounts)
    pod_spec = common.workload_pod_spec(
        container=container,
        config_map_name=config_map_name(name),
        template=spec.template,
        resources=spec.resources,
        restart_policy="Always",
        extra_volumes=volumes,
        # Requests in flight get their deadline to finish after SIGTERM, plus margin.
        termination_grace_period_seconds=min(math.ceil(spec.engine.request_timeout_seconds) + 15, 3600),
    )
    if init_containers:
        pod_spec["containers"][0]["image"] = spec.template.image or vllm.vllm_image()
        pod_spec["initContainers"] = init_containers
    annotations = {
        ANNOTATION_MODEL_URI: model.uri,
        ANNOTATION_MODEL_REVISION: model.revision,
        ANNOTATION_CONFIG_HASH: config_hash(config),
    }
    selector = common.selector_labels(KIND, name)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": common.metadata(name, namespace, _owner(name, uid), _labels(name, spec)),
        "spec": {
            "replicas": desired_replicas(spec, current_replicas),
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": PROGRESS_DEADLINE_S,
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": common.pod_template_metadata(_labels(name), spec.template, annotations),
                "spec": pod_spec,
            },
        },
    }


def build_service(name: str, namespace: str, uid: str, backend: str = "kubeforge") -> dict[str, Any]:
    """The Service; a ``vllm`` backend serves HTTP only (vLLM's server has no gRPC port)."""
    ports = [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}]
    if backend != "vllm":
        ports.append({"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                      "appProtocol": "kubernetes.io/h2c"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": common.metadata(name, namespace, _owner(name, uid), _labels(name)),
        "spec": {
            "type": "ClusterIP",
            "selector": common.selector_labels(KIND, name),
            "ports": ports,
        },
    }


def target_quantity(value: float) -> str:
    """A Kubernetes quantity for ``value``: whole numbers as such, else in milli-units (0.8 -> 800m)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}m"


def build_hpa(name: str, namespace: str, uid: str, spec: InferenceServiceSpec) -> dict[str, Any] | None:
    """The autoscaler, or None when the replica range is a single size (then it must not exist)."""
    if not autoscaled(spec):
        return None
    low, high = hpa_bounds(spec)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": common.metadata(name, namespace, _owner(name, uid), _labels(name),
                                    {"kubeforge.io/prometheus-metric": PROMETHEUS_METRIC_NAMES[spec.autoscaling.metric]}),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": low,
            "maxReplicas": high,
            "metrics": [{
                "type": "Pods",
                "pods": {
                    "metric": {"name": ADAPTER_METRIC_NAMES[spec.autoscaling.metric]},
                    "target": {"type": "AverageValue", "averageValue": target_quantity(spec.autoscaling.target)},
                },
            }],
        },
    }


def build_pdb(name: str, namespace: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": common.metadata(name, namespace, _owner(name, uid), _labels(name)),
        "spec": {
            # One at a time: a drain proceeds (also with a single replica) but never takes
            # several replicas out together; a replica that never became ready may always go.
            "maxUnavailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {"matchLabels": common.selector_labels(KIND, name)},
        },
    }


@dataclass(frozen=True)
class Children:
    config_map: dict[str, Any]
    deployment: dict[str, Any]
    service: dict[str, Any]
    hpa: dict[str, Any] | None
    pdb: dict[str, Any]

    def to_apply(self) -> list[dict[str, Any]]:
        """In dependency order: config before the pods that mount it."""
        out = [self.config_map, self.deployment, self.service]
        if self.hpa is not None:
            out.append(self.hpa)
        out.append(self.pdb)
        return out


def build_children(name: str, namespace: str, uid: str, spec: InferenceServiceSpec, model: ModelRef,
                   current_replicas: int | None = None) -> Children:
    return Children(
        config_map=build_config_map(name, namespace, uid, spec, model),
        deployment=build_deployment(name, namespace, uid, spec, model, current_replicas),
        service=build_service(name, namespace, uid, spec.engine.backend),
        hpa=build_hpa(name, namespace, uid, spec),
        pdb=build_pdb(name, namespace, uid),
    )
