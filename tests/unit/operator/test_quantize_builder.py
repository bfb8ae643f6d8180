"""QuantizeJob builders: config JSON shape, the Job, failure policy, mounts, naming (pure)."""

from __future__ import annotations

import json

import pytest

from kubeforge.api.quantize import QuantizeJobSpec
from kubeforge.builders import quantize as qb
from kubeforge_runtime.quantize.config import parse_config

UID = "0000-uid"


def spec(**over) -> QuantizeJobSpec:
    base = {"model": {"uri": "s3://bucket/base"}, "output": {"uri": "pvc://models/q"}}
    base.update(over)
    return QuantizeJobSpec.model_validate(base)


def test_runtime_config_has_exactly_the_contract_shape_and_parses_in_the_runtime():
    s = spec(method="int4-weight-only", groupSize=64, quantizeEmbeddings=False,
             calibration={"uri": "pvc://data/cal.jsonl", "samples": 32},
             evaluation={"uri": "pvc://data/eval.jsonl", "maxPerplexityIncreasePercent": 2.5,
                         "maxSamples": 16, "sequenceLength": 128})
    cfg = qb.runtime_config("q", "ns", s, "pvc://models/ft/final")
    assert cfg == {
        "kind": "QuantizeJob", "name": "q", "namespace": "ns",
        "model": {"uri": "pvc://models/ft/final"},
        "method": "int4-weight-only", "groupSize": 64, "quantizeEmbeddings": False,
        "calibration": {"uri": "pvc://data/cal.jsonl", "samples": 32},
        "evaluation": {"uri": "pvc://data/eval.jsonl", "maxPerplexityIncreasePercent": 2.5,
                       "maxSamples": 16, "sequenceLength": 128},
        "output": {"uri": "pvc://models/q"},
    }
    parsed = parse_config(json.loads(json.dumps(cfg)))
    assert (parsed.model.uri, parsed.method, parsed.group_size) == ("pvc://models/ft/final", "int4-weight-only", 64)
    assert parsed.evaluation.max_perplexity_increase_percent == 2.5
    assert parsed.quantize_embeddings is False


def test_defaults_render_nulls_the_runtime_accepts():
    cfg = qb.runtime_config("q", "ns", spec(), "s3://bucket/base")
    assert cfg["calibration"] == {"uri": None, "samples": 128}
    assert cfg["evaluation"]["uri"] is None
    parse_config(cfg)


def test_config_map_carries_the_config_and_is_owned():
    cm = qb.build_config_map("q", "ns", UID, spec(), "s3://bucket/base")
    assert cm["metadata"]["name"] == "q-quantize-config"
    assert cm["metadata"]["ownerReferences"][0] == {
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob", "name": "q", "uid": UID,
        "controller": True, "blockOwnerDeletion": True}
    assert json.loads(cm["data"]["config.json"])["model"] == {"uri": "s3://bucket/base"}


def test_job_runs_one_hardened_pod_with_the_contract_command():
    job = qb.build_job("q", "ns", UID, spec(backoffLimit=2), "s3://bucket/base")
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == ("batch/v1", "Job", "q-quantize")
    assert job["metadata"]["ownerReferences"][0]["uid"] == UID
    assert job["metadata"]["annotations"][qb.ANNOTATION_MODEL_URI] == "s3://bucket/base"
    js = job["spec"]
    assert (js["parallelism"], js["completions"], js["backoffLimit"]) == (1, 1, 2)
    assert "activeDeadlineSeconds" not in js and "ttlSecondsAfterFinished" not in js
    pod = js["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    assert c["name"] == "quantize"
    assert c["command"] == ["python", "-m", "kubeforge_runtime.quantize", "--config", "/etc/kubeforge/config.json"]
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "kubeforge-config", "configMap": {"name": "q-quantize-config"}} in pod["volumes"]
    assert js["template"]["metadata"]["labels"]["kubeforge.io/quantizejob"] == "q"


def test_pod_failure_policy_fails_at_once_on_config_and_gate_exit_codes():
    rules = qb.build_job("q", "ns", UID, spec(), "s3://b/m")["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob",
                        "onExitCodes": {"containerName": "quantize", "operator": "In", "values": [78, 79]}}
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"


def test_deadline_ttl_resources_and_template_overrides():
    s = spec(activeDeadlineSeconds=600, ttlSecondsAfterFinished=0,
             resources={"gpus": 1, "cpu": "4", "memory": "16Gi"},
             template={"labels": {"kueue.x-k8s.io/queue-name": "q1"}, "nodeSelector": {"gpu": "a100"},
                       "image": "registry.example/rt:1"})
    job = qb.build_job("q", "ns", UID, s, "s3://b/m")
    assert job["spec"]["activeDeadlineSeconds"] == 600 and job["spec"]["ttlSecondsAfterFinished"] == 0
    # Kueue reads its queue label from the Job itself.
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q1"
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"] == {"limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                              "requests": {"cpu": "4", "memory": "16Gi"}}
    assert c["image"] == "registry.example/rt:1"
    assert pod["nodeSelector"] == {"gpu": "a100"}


def test_every_distinct_pvc_is_mounted_once():
    s = spec(output={"uri": "pvc://models/q"}, calibration={"uri": "pvc://data/cal.jsonl"},
             evaluation={"uri": "pvc://data/eval.jsonl"})
    job = qb.build_job("q", "ns", UID, s, "pvc://models/ft/final")
    pod = job["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["models", "data"]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/mnt/pvc/models", "/mnt/pvc/data"} <= mounts


def test_no_pvc_volume_for_object_store_uris():
    pod = qb.build_job("q", "ns", UID, spec(output={"uri": "s3://b/out"}), "s3://b/m")["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]


@pytest.mark.parametrize("name", ["q", "a" * 40, "b" * 63, "c" * 200])
def test_child_names_are_deterministic_and_fit_label_values(name):
    first, second = qb.job_name(name), qb.job_name(name)
    assert first == second and len(first) <= 63 and first.endswith("-quantize")
    assert not first.startswith("-") and "--" not in first


def test_long_names_sharing_a_prefix_do_not_collide():
    a, b = "x" * 60 + "a", "x" * 60 + "b"
    assert qb.job_name(a) != qb.job_name(b)


def test_build_children_puts_the_config_first():
    kinds = [c["kind"] for c in qb.build_children("q", "ns", UID, spec(), "s3://b/m")]
    assert kinds == ["ConfigMap", "Job"]
