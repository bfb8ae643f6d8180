"""InferenceService builders: serve config, Deployment, Service, HPA, PDB (pure)."""

from __future__ import annotations

import json

import pytest

from kubeforge.api.inference import InferenceServiceSpec
from kubeforge.builders import inference as ib
from kubeforge_runtime.serve.config import parse_config

UID = "uid-1"
MODEL = ib.ModelRef("s3://models/base", "rev1")


def spec(**over) -> InferenceServiceSpec:
    base = {"model": {"uri": "s3://models/base"}}
    base.update(over)
    return InferenceServiceSpec.model_validate(base)


def container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


# --- config ---------------------------------------------------------------------------------------
def test_serve_config_has_exactly_the_contract_shape_and_parses_in_the_runtime():
    s = spec(adapters=[{"name": "sql", "uri": "pvc://adapters/sql"}],
             engine={"backend": "kubeforge", "batching": "continuous", "dtype": "bfloat16", "maxBatchTokens": 2048, "maxConcurrentRequests": 8,
                     "maxQueuedRequests": 32, "kvBlockSize": 32, "maxModelLength": 1024, "requestTimeoutSeconds": 30,
                     "maxRequestBodyBytes": 1048576, "compile": "on"})
    cfg = ib.serve_config("chat", "ns", s, ib.ModelRef("pvc://models/ft/final", "r"))
    assert cfg == {
        "kind": "InferenceService", "name": "chat", "namespace": "ns", "servedModelName": "chat",
        "model": {"uri": "pvc://models/ft/final"},
        "adapters": [{"name": "sql", "uri": "pvc://adapters/sql"}],
        "engine": {"backend": "kubeforge", "batching": "continuous", "dtype": "bfloat16", "maxBatchTokens": 2048, "maxConcurrentRequests": 8,
                   "maxQueuedRequests": 32, "kvBlockSize": 32, "prefixCaching": True, "maxModelLength": 1024,
                   "requestTimeoutSeconds": 30, "maxRequestBodyBytes": 1048576, "compile": "on"},
        "port": 8000, "grpcPort": 8001,
    }
    parsed = parse_config(json.loads(json.dumps(cfg)))
    assert parsed.model_names() == ["chat", "sql"]
    assert parsed.engine.max_model_length == 1024


def test_default_config_parses_with_a_null_max_model_length():
    cfg = ib.serve_config("chat", "ns", spec(), MODEL)
    assert cfg["engine"]["maxModelLength"] is None and cfg["adapters"] == []
    parse_config(cfg)


def test_config_map_is_owned_and_named_after_the_service():
    cm = ib.build_config_map("chat", "ns", UID, spec(), MODEL)
    assert cm["metadata"]["name"] == "chat-serve-config"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == UID
    assert json.loads(cm["data"]["config.json"])["model"]["uri"] == "s3://models/base"


# --- deployment -----------------------------------------------------------------------------------
def test_deployment_command_ports_and_probes():
    dep = ib.build_deployment("chat", "ns", UID, spec(), MODEL)
    assert (dep["apiVersion"], dep["kind"], dep["metadata"]["name"]) == ("apps/v1", "Deployment", "chat")
    c = container(dep)
    assert c["command"] == ["python", "-m", "kubeforge_runtime.serve", "--config", "/etc/kubeforge/config.json"]
    assert {(p["name"], p["containerPort"]) for p in c["ports"]} == {("http", 8000), ("grpc", 8001)}
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # The startup probe allows a long start; liveness only takes over after it passes.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    pod = dep["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Always" and pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] == 120 + 15
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_selector_is_the_stable_subset_of_the_pod_labels():
    dep = ib.build_deployment("chat", "ns", UID, spec(template={"labels": {"team": "a"}}), MODEL)
    sel = dep["spec"]["selector"]["matchLabels"]
    assert sel == {"app.kubernetes.io/instance": "chat", "kubeforge.io/inferenceservice": "chat"}
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert sel.items() <= pod_labels.items() and pod_labels["team"] == "a"


def test_template_annotations_carry_the_revision_so_a_new_output_rolls_the_pods():
    a = ib.build_deployment("chat", "ns", UID, spec(), ib.ModelRef("s3://m/v1", "r1"))
    b = ib.build_deployment("chat", "ns", UID, spec(), ib.ModelRef("s3://m/v1", "r2"))
    ann_a, ann_b = a["spec"]["template"]["metadata"]["annotations"], b["spec"]["template"]["metadata"]["annotations"]
    assert ann_a[ib.ANNOTATION_MODEL_URI] == "s3://m/v1" and ann_a[ib.ANNOTATION_MODEL_REVISION] == "r1"
    assert ann_a != ann_b
    same = ib.build_deployment("chat", "ns", UID, spec(), ib.ModelRef("s3://m/v1", "r1"))
    assert same == a  # deterministic: re-applying is a no-op


def test_a_config_change_rolls_the_pods_too():
    a = ib.build_deployment("chat", "ns", UID, spec(), MODEL)
    b = ib.build_deployment("chat", "ns", UID, spec(engine={"maxConcurrentRequests": 4}), MODEL)
    key = ib.ANNOTATION_CONFIG_HASH
    assert a["spec"]["template"]["metadata"]["annotations"][key] != b["spec"]["template"]["metadata"]["annotations"][key]


def test_api_key_comes_from_the_secret_by_reference_only():
    dep = ib.build_deployment("chat", "ns", UID, spec(apiKeySecretRef={"name": "k", "key": "token"}), MODEL)
    env = container(dep)["env"]
    assert {"name": "KUBEFORGE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "k", "key": "token"}}} in env
    without = container(ib.build_deployment("chat", "ns", UID, spec(), MODEL))["env"]
    assert not [e for e in without if e["name"] == "KUBEFORGE_API_KEY"]


def test_model_and_adapter_claims_are_mounted():
    s = spec(adapters=[{"name": "a", "uri": "pvc://adapters/a"}, {"name": "b", "uri": "pvc://models/b"}])
    dep = ib.build_deployment("chat", "ns", UID, s, ib.ModelRef("pvc://models/base", "r"))
    pod = dep["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["models", "adapters"]


def test_resources_and_template_overrides():
    s = spec(resources={"gpus": 2, "memory": "40Gi"}, template={"nodeSelector": {"gpu": "h100"}, "image": "r/img:2"})
    dep = ib.build_deployment("chat", "ns", UID, s, MODEL)
    c = container(dep)
    assert c["resources"]["limits"] == {"memory": "40Gi", "nvidia.com/gpu": "2"}
    assert c["image"] == "r/img:2" and dep["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "h100"}


# --- replicas and the HPA ---------------------------------------------------------------------------
def test_fixed_size_has_no_hpa_and_sets_replicas():
    s = spec(replicas={"min": 3, "max": 3})
    assert ib.build_hpa("chat", "ns", UID, s) is None
    assert ib.build_deployment("chat", "ns", UID, s, MODEL, current_replicas=7)["spec"]["replicas"] == 3
    assert [c["kind"] for c in ib.build_children("chat", "ns", UID, s, MODEL).to_apply()] == \
        ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]


@pytest.mark.parametrize("current,expected", [(None, 2), (1, 2), (4, 4), (9, 5)])
def test_autoscaled_replicas_keep_the_hpa_decision_within_range(current, expected):
    s = spec(replicas={"min": 2, "max": 5})
    assert ib.desired_replicas(s, current) == expected


@pytest.mark.parametrize("metric,name,target,quantity", [
    ("concurrency", "vllm_num_requests_running", 8, "8"),
    ("queueDepth", "vllm_num_requests_waiting", 2.5, "2500m"),
    ("kvCacheUsage", "vllm_kv_cache_usage_perc", 0.8, "800m"),
])
def test_hpa_uses_the_adapter_name_of_the_vllm_metric(metric, name, target, quantity):
    s = spec(replicas={"min": 1, "max": 4}, autoscaling={"metric": metric, "target": target})
    hpa = ib.build_hpa("chat", "ns", UID, s)
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["metadata"]["ownerReferences"][0]["uid"] == UID
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    (m,) = hpa["spec"]["metrics"]
    assert m == {"type": "Pods", "pods": {"metric": {"name": name},
                                          "target": {"type": "AverageValue", "averageValue": quantity}}}
    assert hpa["metadata"]["annotations"]["kubeforge.io/prometheus-metric"] == ib.PROMETHEUS_METRIC_NAMES[metric]


def test_min_zero_autoscaled_keeps_one_replica():
    s = spec(replicas={"min": 0, "max": 3})
    assert ib.build_hpa("chat", "ns", UID, s)["spec"]["minReplicas"] == 1
    assert ib.desired_replicas(s, None) == 1


def test_min_zero_max_one_runs_one_replica():
    s = spec(replicas={"min": 0, "max": 1})
    # max > min: autoscaled between 1 and 1 (an HPA cannot scale to zero without a feature gate).
    assert ib.desired_replicas(s, 0) == 1
    assert ib.build_hpa("chat", "ns", UID, s)["spec"]["minReplicas"] == 1


# --- service and pdb -----------------------------------------------------------------------------
def test_service_exposes_http_and_grpc_and_selects_the_pods():
    svc = ib.build_service("chat", "ns", UID)
    assert svc["metadata"]["name"] == "chat" and svc["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == \
        [("http", 8000, "http"), ("grpc", 8001, "grpc")]
    assert svc["spec"]["selector"] == {"app.kubernetes.io/instance": "chat", "kubeforge.io/inferenceservice": "chat"}
    assert ib.url("chat", "ns") == "http://chat.ns.svc:8000/v1"


def test_pdb_allows_one_disruption_at_a_time():
    pdb = ib.build_pdb("chat", "ns", UID)
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["selector"]["matchLabels"]["kubeforge.io/inferenceservice"] == "chat"


def test_target_quantity():
    assert [ib.target_quantity(v) for v in (1, 1.0, 0.5, 12.25)] == ["1", "1", "500m", "12250m"]
