"""QuantizeJob children: the rendered runtime config and the one-pod ``batch/v1`` Job.

Called by :mod:`kubeforge.controllers.quantize` once the model to compress is known (a URI
from the spec, or the output URI of the referenced FineTuneJob). Everything here is pure:
``spec -> manifests``, no I/O, so the unit tests check every branch without a cluster.

The pod runs ``python -m kubeforge_runtime.quantize --config /etc/kubeforge/config.json``
(see ``trainer_image/kubeforge_runtime/quantize/config.py`` for the config it parses). It
writes a compact JSON report to ``/dev/termination-log``; Kubernetes copies that file into
the pod status, which is how the operator learns the result without giving the pod an API
token. ``FallbackToLogsOnError`` makes a crash before the report exists still explain itself
(the log tail becomes the message).

Exit codes 78 (configuration error) and 79 (quality gate failed) cannot be fixed by running
the pod again, so a ``podFailurePolicy`` fails the Job at once on them instead of spending
the back-off budget; a disruption (node drain, preemption) is not counted against it.
"""

from __future__ import annotations

from typing import Any

from kubeforge_runtime import contract

from ..api.quantize import QuantizeJobSpec
from . import common
from .names import child_name

KIND = "QuantizeJob"
COMPONENT = "quantizer"
CONTAINER_NAME = "quantize"
COMMAND = ["python", "-m", "kubeforge_runtime.quantize", "--config", f"{contract.CONFIG_DIR}/{contract.CONFIG_FILE}"]
ANNOTATION_MODEL_URI = "kubeforge.io/model-uri"
"""Set on the Job: the model URI it was started with (the reference may change later)."""
# Exit codes that no retry can fix (contract.py): fail the Job on the first occurrence.
NON_RETRYABLE_EXIT_CODES = [contract.EXIT_CONFIG_ERROR, contract.EXIT_QUALITY_GATE_FAILED]


def job_name(name: str) -> str:
    """The Job's name; the ``-quantize`` suffix keeps it apart from a FineTuneJob's Job of the same name."""
    # Job names become label values (batch.kubernetes.io/job-name): at most 63 characters.
    return child_name(name, "quantize")


def config_map_name(name: str) -> str:
    return child_name(name, "quantize-config", 253)


_CONFIG_FIELDS = {"method", "group_size", "quantize_embeddings", "calibration", "evaluation", "output"}
"""The spec's parts the quantizer reads, unchanged in shape (``kubeforge_runtime.quantize.config``);
``model`` is rendered as the resolved URI."""
_ONLY_WHEN_SET = {"evaluation": ("task", "max_accuracy_drop_points")}
"""Optional parts added to the contract later: left out while unset, so that a runtime image
older than the operator (which refuses keys it does not know) still runs configs that do not
use them. Every other default, null included, is written out."""


def runtime_config(name: str, namespace: str, spec: QuantizeJobSpec, model_uri: str) -> dict[str, Any]:
    """The JSON the quantizer reads, exactly the shape ``kubeforge_runtime.quantize.config`` parses."""
    unset = {section: {f for f in fields if getattr(getattr(spec, section), f) is None}
             for section, fields in _ONLY_WHEN_SET.items()}
    body = spec.model_dump(by_alias=True, mode="json", include=_CONFIG_FIELDS, exclude=unset)
    return {"kind": KIND, "name": name, "namespace": namespace, "model": {"uri": model_uri}, **body}


def build_config_map(name: str, namespace: str, uid: str, spec: QuantizeJobSpec, model_uri: str) -> dict[str, Any]:
    owner = common.owner_reference(KIND, name, uid)
    lbls = common.labels(KIND, name, COMPONENT)
    return common.config_map(config_map_name(name), namespace, owner, lbls,
                             runtime_config(name, namespace, spec, model_uri))


def build_job(name: str, namespace: str, uid: str, spec: QuantizeJobSpec, model_uri: str) -> dict[str, Any]:
    """The one-pod Job that runs the quantizer."""
    owner = common.owner_reference(KIND, name, uid)
    lbls = {**spec.template.labels, **common.labels(KIND, name, COMPONENT)}
    volumes, mounts = common.pvc_volumes(
        [model_uri, spec.calibration.uri, spec.evaluation.uri,
         spec.evaluation.task.uri if spec.evaluation.task else None, spec.output.uri]
    )
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "command": list(COMMAND),
        "env": [*common.base_env(KIND, name, namespace), *common.storage_env(spec.storage)],
        "resources": common.container_resources(spec.resources),
        "volumeMounts": mounts,
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec = common.workload_pod_spec(
        container=container,
        config_map_name=config_map_name(name),
        template=spec.template,
        resources=spec.resources,
        restart_policy="Never",  # required by podFailurePolicy; the Job makes the next pod
        extra_volumes=volumes,
    )
    job_spec: dict[str, Any] = {
        "parallelism": 1,
        "completions": 1,
        "backoffLimit": spec.backoff_limit,
        "podFailurePolicy": {"rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": list(NON_RETRYABLE_EXIT_CODES)}},
            # An evicted or preempted pod did nothing wrong: retry without using the budget.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {
            "metadata": common.pod_template_metadata(common.labels(KIND, name, COMPONENT), spec.template),
            "spec": pod_spec,
        },
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": common.metadata(job_name(name), namespace, owner, lbls, {ANNOTATION_MODEL_URI: model_uri}),
        "spec": job_spec,
    }


def build_children(name: str, namespace: str, uid: str, spec: QuantizeJobSpec, model_uri: str) -> list[dict[str, Any]]:
    """Everything the reconciler applies, config first (the pod mounts it)."""
    return [build_config_map(name, namespace, uid, spec, model_uri), build_job(name, namespace, uid, spec, model_uri)]
