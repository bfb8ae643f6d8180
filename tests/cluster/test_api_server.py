"""The API server itself enforces the KubeForge API: schema, defaults, CEL rules, explain."""

from __future__ import annotations

import json

import pytest
import yaml

from support.waiting import get_json

pytestmark = pytest.mark.cluster


def ftj(name: str = "demo", **spec_overrides) -> dict:
    spec = {
        "model": {"uri": "hf://acme/tiny-llama@main"},
        "dataset": {"uri": "pvc://data/train.jsonl"},
        "output": {"uri": "pvc://models/demo"},
        "nodes": {"min": 2, "max": 2},
        "resources": {"gpus": 8},
    }
    spec.update(spec_overrides)
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def apply(cluster, namespace, obj, *extra):
    return cluster.kubectl("apply", "-n", namespace, *extra, "-f", "-", input=yaml.safe_dump(obj))


def test_control_plane_starts_in_under_a_minute(cluster):
    # Measured from the first certificate to three Ready GPU nodes; printed in the summary.
    assert cluster.startup_seconds < 60, f"control plane took {cluster.startup_seconds:.1f} s to start"
    gpus = cluster.kubectl("get", "nodes", "-o", "jsonpath={.items[*].status.allocatable.nvidia\\.com/gpu}",
                           check=True).stdout.split()
    assert len(gpus) >= 2 and all(g == "8" for g in gpus)


def test_crds_established_with_category_and_short_names(cluster, namespace):
    names = cluster.kubectl("get", "crd", "-l", "app.kubernetes.io/part-of=kubeforge", "-o", "name", check=True).stdout.split()
    assert sorted(names) == sorted([
        "customresourcedefinition.apiextensions.k8s.io/finetunejobs.kubeforge.io",
        "customresourcedefinition.apiextensions.k8s.io/inferenceservices.kubeforge.io",
        "customresourcedefinition.apiextensions.k8s.io/quantizejobs.kubeforge.io",
    ])
    assert apply(cluster, namespace, ftj()).returncode == 0
    out = cluster.kubectl("get", "kubeforge", "-n", namespace, check=True).stdout
    assert "finetunejob.kubeforge.io/demo" in out
    assert cluster.kubectl("get", "ftj", "-n", namespace, "demo").returncode == 0


def test_explain_shows_field_descriptions(cluster):
    out = cluster.kubectl("explain", "finetunejob.spec", check=True).stdout
    assert "Desired state of a FineTuneJob." in out
    assert "Elastic range of worker nodes (pods)." in out
    deep = cluster.kubectl("explain", "finetunejob.spec.parallelism.tensor", check=True).stdout
    assert "Tensor-parallel degree" in deep


def test_defaults_are_applied_by_the_api_server(cluster, namespace):
    apply(cluster, namespace, ftj("defaults"))
    spec = get_json(cluster, "-n", namespace, "finetunejob", "defaults")["spec"]
    assert spec["parallelism"] == {"tensor": 1, "pipeline": 1, "strategy": "fsdp", "pipelineSchedule": "1F1B"}
    assert spec["training"]["learningRate"] == pytest.approx(1e-4)
    assert spec["lora"]["targetModules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert spec["method"] == "lora"


@pytest.mark.parametrize("obj, field_in_message", [
    (ftj("unknown", bogusField=1), "bogusField"),
    (ftj("negative", nodes={"min": -1, "max": 2}), "spec.nodes.min"),
    (ftj("minmax", nodes={"min": 3, "max": 2}), "nodes.min must be less than or equal to nodes.max"),
    (ftj("divides", nodes={"min": 1, "max": 2}, resources={"gpus": 8}, procsPerNode=6,
         parallelism={"tensor": 4, "pipeline": 1}), "parallelism.tensor × parallelism.pipeline must divide"),
    (ftj("badschedule", parallelism={"pipelineSchedule": "Zigzag"}), "spec.parallelism.pipelineSchedule"),
    (ftj("zero-tp", parallelism={"strategy": "deepspeed-zero3", "tensor": 2}),
     "DeepSpeed ZeRO strategies run data parallel only"),
    (ftj("zero-fp16", parallelism={"strategy": "deepspeed-zero2"}, training={"precision": "fp16"}),
     "DeepSpeed ZeRO strategies train in bf16 or fp32"),
    (ftj("eval-text", evaluation={"uri": "pvc://data/test.jsonl", "metric": "accuracy"}),
     "evaluation needs prompts and answers"),
    (ftj("labels-text", dataset={"uri": "pvc://data/t.jsonl", "checks": {"maxLabelImbalance": 3}}),
     "dataset.checks.maxLabelImbalance needs labels"),
    (ftj("share-over-one", dataset={"uri": "pvc://data/t.jsonl", "checks": {"maxDuplicateShare": 1.5}}),
     "spec.dataset.checks.maxDuplicateShare"),
    (ftj("eval-metric", dataset={"uri": "pvc://data/t.jsonl", "format": "chat"},
         evaluation={"uri": "pvc://data/test.jsonl", "metric": "bleu"}), "spec.evaluation.metric"),
    ({"apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob", "metadata": {"name": "gate-no-task"},
      "spec": {"model": {"uri": "pvc://models/base"}, "output": {"uri": "pvc://models/q"},
               "evaluation": {"maxAccuracyDropPoints": 1}}},
     "evaluation.maxAccuracyDropPoints gates the task metric: set evaluation.task too"),
    ({"apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob", "metadata": {"name": "awq-no-data"},
      "spec": {"model": {"uri": "pvc://models/base"}, "output": {"uri": "pvc://models/q"},
               "method": "int4-weight-only-awq"}},
     "method int4-weight-only-awq calibrates on your data: set calibration.uri"),
    ({"apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob", "metadata": {"name": "both"},
      "spec": {"model": {"uri": "pvc://models/base", "fineTuneJobRef": {"name": "demo"}},
               "output": {"uri": "pvc://models/q"}}},
     "model: give exactly one of uri or fineTuneJobRef"),
    ({"apiVersion": "kubeforge.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "both"},
      "spec": {"model": {"uri": "pvc://models/base", "quantizeJobRef": {"name": "q"}}}},
     "model: give exactly one of uri, fineTuneJobRef or quantizeJobRef"),
    ({"apiVersion": "kubeforge.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "none"},
      "spec": {"model": {}}},
     "model: give exactly one of uri, fineTuneJobRef or quantizeJobRef"),
    # Rules that used to be checked only in the pod, the operator or the webhook (tests/unit/test_api_rules.py):
    (ftj("ddp-tp", parallelism={"strategy": "ddp", "tensor": 2}),
     "parallelism.strategy ddp cannot be combined with parallelism.tensor > 1"),
    (ftj("fp16-pp", parallelism={"pipeline": 2}, training={"precision": "fp16"}),
     "training.precision fp16 is not supported with pipeline parallelism"),
    (ftj("reserved-env", template={"env": [{"name": "OK", "value": "1"}, {"name": "PET_NNODES", "value": "3"}]}),
     "template.env: PET_NNODES is set by the operator and cannot be overridden"),
    (ftj("reserved-label", template={"labels": {"team": "a", "kubeforge.io/inferenceservice": "chat"}}),
     "spec.template.labels: Invalid value: template.labels: kubeforge.io/inferenceservice is reserved "
     "for the operator"),
    ({"apiVersion": "kubeforge.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "reserved-label"},
      "spec": {"model": {"uri": "pvc://models/base"}, "template": {"labels": {"serving.kubeforge.io/x": "1"}}}},
     "template.labels: serving.kubeforge.io/x is reserved for the operator"),
    ({"apiVersion": "kubeforge.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "dup"},
      "spec": {"model": {"uri": "pvc://models/base"}, "adapters": [
          {"name": "sql", "uri": "pvc://m/a1"}, {"name": "chat", "uri": "pvc://m/a2"}, {"name": "sql", "uri": "pvc://m/a3"}]}},
     "spec.adapters: names must be unique; repeated: sql"),
    ({"apiVersion": "kubeforge.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "chat"},
      "spec": {"model": {"uri": "pvc://models/base"}, "adapters": [{"name": "chat", "uri": "pvc://m/a1"}]}},
     'spec.adapters: adapter name "chat" clashes with the base model'),
])
def test_api_server_rejects_invalid_specs(cluster, namespace, obj, field_in_message):
    out = apply(cluster, namespace, obj)
    assert out.returncode != 0, f"accepted an invalid object:\n{out.stdout}"
    assert field_in_message in out.stderr, out.stderr
    # Nothing was stored.
    assert cluster.kubectl("get", "-n", namespace, obj["kind"].lower(), obj["metadata"]["name"]).returncode != 0


def test_status_is_a_subresource(cluster, namespace):
    apply(cluster, namespace, ftj("sub"))
    # A status written through the main resource is ignored; through /status it sticks.
    cluster.kubectl("patch", "-n", namespace, "finetunejob", "sub", "--type=merge", "-p",
                    json.dumps({"status": {"phase": "Running"}}), check=True)
    assert "status" not in get_json(cluster, "-n", namespace, "finetunejob", "sub") or \
        get_json(cluster, "-n", namespace, "finetunejob", "sub")["status"].get("phase") is None
    cluster.kubectl("patch", "-n", namespace, "finetunejob", "sub", "--subresource=status", "--type=merge", "-p",
                    json.dumps({"status": {"phase": "Running"}}), check=True)
    assert get_json(cluster, "-n", namespace, "finetunejob", "sub")["status"]["phase"] == "Running"
