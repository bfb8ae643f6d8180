"""NetworkPolicies of the workloads (pure builders), and that the controllers render them.

What is checked here is the object: that its selector picks exactly the resource's pods as the
other builders label them, and which peers reach which ports. Enforcement is the CNI
plugin's; the cluster test (tests/cluster/test_workload_policy.py) shows the objects on a real
API server selecting the real pods.
"""

from __future__ import annotations

import pytest

from kubeforge.api import FineTuneJobSpec, InferenceServiceSpec
from kubeforge.builders import finetune, inference, network
from kubeforge.controllers import finetune as finetune_controller
from kubeforge_runtime import contract

FTJ = FineTuneJobSpec.model_validate({"model": {"uri": "hf://a/b"}, "dataset": {"uri": "pvc://d/t.jsonl"},
                                      "output": {"uri": "pvc://m/o"}, "nodes": {"min": 2, "max": 2}})
ISVC = InferenceServiceSpec.model_validate({"model": {"uri": "pvc://m/base"}})
PROM = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
OPERATOR = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeforge"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}}}
SETTINGS = network.NetworkPolicySettings(prometheus=(PROM,), operator=(OPERATOR,))


def selects(policy: dict, pod_labels: dict) -> bool:
    return all(pod_labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())


def rule_for(policy: dict, port: int) -> list[dict]:
    """The peers allowed on ``port`` (a rule without ports allows every port)."""
    return [peer for r in policy["spec"]["ingress"]
            if "ports" not in r or any(p["port"] == port for p in r["ports"]) for peer in r["from"]]


def test_finetune_policy_selects_the_workers_and_only_they_reach_the_rendezvous():
    pol = network.finetune_policy("ft", "ns", "uid-ft", SETTINGS)
    job = finetune.job("ft", "ns", "uid-ft", FTJ)
    assert selects(pol, job["spec"]["template"]["metadata"]["labels"])
    other = finetune.job("ft2", "ns", "uid-2", FTJ)
    assert not selects(pol, other["spec"]["template"]["metadata"]["labels"])
    assert pol["metadata"]["ownerReferences"][0]["uid"] == "uid-ft" and pol["spec"]["policyTypes"] == ["Ingress"]
    own = {"podSelector": pol["spec"]["podSelector"]}
    # The rendezvous store (a pickle) and torch's ephemeral gloo/NCCL ports: the job's own pods only.
    assert rule_for(pol, contract.RENDEZVOUS_PORT) == [own]
    assert rule_for(pol, 40123) == [own]
    assert rule_for(pol, contract.DEFAULT_METRICS_PORT) == [own, PROM, OPERATOR]


def test_inference_policy_selects_the_servers_clients_and_prometheus():
    pol = network.inference_policy("chat", "ns", "uid-c", SETTINGS)
    dep = inference.build_deployment("chat", "ns", "uid-c", ISVC, inference.ModelRef("pvc://m/base", ""))
    assert selects(pol, dep["spec"]["template"]["metadata"]["labels"])
    assert rule_for(pol, contract.SERVE_GRPC_PORT) == [{"podSelector": {}}]  # default: same namespace
    assert rule_for(pol, contract.SERVE_HTTP_PORT) == [{"podSelector": {}}, PROM]
    assert rule_for(pol, contract.RENDEZVOUS_PORT) == []


def test_no_peers_means_no_one_never_everyone():
    """An ingress rule with an empty ``from`` would allow every source: it is left out instead."""
    closed = network.NetworkPolicySettings(prometheus=(), serving_clients=(), operator=())
    pol = network.inference_policy("chat", "ns", "u", closed)
    assert pol["spec"]["ingress"] == []
    ft = network.finetune_policy("ft", "ns", "u", closed)
    assert len(ft["spec"]["ingress"]) == 1 and ft["spec"]["ingress"][0]["from"]


def test_settings_from_env():
    assert network.settings_from_env({}) == network.NetworkPolicySettings()
    s = network.settings_from_env({network.ENV_ENABLED: "false", network.ENV_PROMETHEUS_PEERS: '[{"podSelector": {}}]',
                                   network.ENV_SERVING_CLIENT_PEERS: "[]"})
    assert s == network.NetworkPolicySettings(False, ({"podSelector": {}},), (), ())
    with pytest.raises(ValueError, match="JSON list of NetworkPolicyPeer"):
        network.settings_from_env({network.ENV_OPERATOR_PEERS: '{"podSelector": {}}'})


def test_finetune_controller_applies_the_policy_first_unless_turned_off(monkeypatch):
    owner = {"kind": "FineTuneJob", "metadata": {"name": "ft", "namespace": "ns", "uid": "uid-ft"}}
    monkeypatch.delenv(network.ENV_ENABLED, raising=False)
    kinds = [c["kind"] for c in finetune_controller.children(owner, FTJ)]
    assert kinds == ["NetworkPolicy", "Service", "ConfigMap", "Job"]
    monkeypatch.setenv(network.ENV_ENABLED, "false")
    assert [c["kind"] for c in finetune_controller.children(owner, FTJ)] == ["Service", "ConfigMap", "Job"]
