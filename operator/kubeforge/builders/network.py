"""NetworkPolicies of the workloads (pure builders; the controllers apply them as owned children).

Without them any pod in the cluster could reach a model server (which has no API key by
default), a trainer's metrics endpoint and - worst - the c10d rendezvous store on
``contract.RENDEZVOUS_PORT``, whose state is unpickled by the workers. Each policy selects
one resource's pods (its stable selector labels) and allows ingress only from:

* **FineTuneJob workers**: the job's own pods, on every port (torchrun's rendezvous store,
  ``MASTER_PORT`` and the gloo/NCCL connections, which use ephemeral ports); Prometheus and
  the operator (which reads training progress from rank 0) on the metrics port;
* **InferenceService servers**: the configured clients (default: every pod in the same
  namespace) on the HTTP and gRPC ports; Prometheus on the HTTP port (``/metrics``).

QuantizeJobs get none: their pods listen on nothing. The kubelet's probes are not pod
traffic and are not affected. Policies are only *enforced* where the cluster's CNI plugin
implements NetworkPolicy (Calico, Cilium, ...); elsewhere they are inert objects.

The peers come from :class:`NetworkPolicySettings`, which the operator reads from its
environment (:func:`settings_from_env`; the chart fills it from ``networkPolicy`` values).
A peer is a NetworkPolicyPeer as written in a NetworkPolicy (``podSelector``,
``namespaceSelector``, ``ipBlock``); an empty list of peers means *no one*, never everyone
(the rule is left out rather than rendered with an empty ``from``, which would allow all).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kubeforge_runtime import contract

from . import common

SAME_NAMESPACE: tuple[dict[str, Any], ...] = ({"podSelector": {}},)
"""Every pod of the policy's own namespace (a peer with only a podSelector stays in that namespace)."""

ENV_ENABLED = "KUBEFORGE_NETWORK_POLICIES"
ENV_PROMETHEUS_PEERS = "KUBEFORGE_NETWORK_POLICY_PROMETHEUS"
ENV_SERVING_CLIENT_PEERS = "KUBEFORGE_NETWORK_POLICY_SERVING_CLIENTS"
ENV_OPERATOR_PEERS = "KUBEFORGE_NETWORK_POLICY_OPERATOR"


@dataclass(frozen=True)
class NetworkPolicySettings:
    """Whether workloads get NetworkPolicies, and who may reach them."""

    enabled: bool = True
    prometheus: tuple[dict[str, Any], ...] = ()
    """Peers that may scrape metrics (the chart: its ``networkPolicy.prometheus`` selectors)."""
    serving_clients: tuple[dict[str, Any], ...] = field(default=SAME_NAMESPACE)
    """Peers that may call model servers; default: pods of the InferenceService's namespace."""
    operator: tuple[dict[str, Any], ...] = ()
    """Peers of the operator's own pods (it scrapes training progress); none when it runs outside."""


def _peers(env: dict[str, str], key: str, default: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
    raw = env.get(key)
    if raw is None or not raw.strip():
        return default
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(p, dict) for p in value):
        raise ValueError(f"{key} must be a JSON list of NetworkPolicyPeer objects, got {raw!r}")
    return tuple(value)


def settings_from_env(env: dict[str, str]) -> NetworkPolicySettings:
    """The settings the operator's environment describes (unset variables keep the defaults)."""
    from ..api.policy import parse_bool

    return NetworkPolicySettings(
        enabled=parse_bool(env.get(ENV_ENABLED), True),
        prometheus=_peers(env, ENV_PROMETHEUS_PEERS, ()),
        serving_clients=_peers(env, ENV_SERVING_CLIENT_PEERS, SAME_NAMESPACE),
        operator=_peers(env, ENV_OPERATOR_PEERS, ()),
    )


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def _rule(peers: list[dict[str, Any]] | tuple[dict[str, Any], ...], ports: list[dict[str, Any]] | None
          ) -> list[dict[str, Any]]:
    """One ingress rule, or none when there are no peers (an empty ``from`` would allow everyone)."""
    if not peers:
        return []
    rule: dict[str, Any] = {"from": [dict(p) for p in peers]}
    if ports is not None:
        rule["ports"] = ports
    return [rule]


def network_policy(kind: str, name: str, namespace: str, uid: str, component: str,
                   ingress: list[dict[str, Any]]) -> dict[str, Any]:
    """A NetworkPolicy owned by ``kind``/``name`` over its pods, allowing only ``ingress``."""
    owner = common.owner_reference(kind, name, uid)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": common.metadata(name, namespace, owner, common.labels(kind, name, component)),
        "spec": {
            "podSelector": {"matchLabels": common.selector_labels(kind, name)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def finetune_policy(name: str, namespace: str, uid: str, settings: NetworkPolicySettings) -> dict[str, Any]:
    """Workers: each other on any port; Prometheus and the operator on the metrics port."""
    own = {"podSelector": {"matchLabels": common.selector_labels("FineTuneJob", name)}}
    ingress = [*_rule([own], None),
               *_rule([*settings.prometheus, *settings.operator], _tcp(contract.DEFAULT_METRICS_PORT))]
    return network_policy("FineTuneJob", name, namespace, uid, "trainer", ingress)


def inference_policy(name: str, namespace: str, uid: str, settings: NetworkPolicySettings) -> dict[str, Any]:
    """Servers: the configured clients on HTTP and gRPC; Prometheus on HTTP (``/metrics``)."""
    ingress = [*_rule(settings.serving_clients, _tcp(contract.SERVE_HTTP_PORT, contract.SERVE_GRPC_PORT)),
               *_rule(settings.prometheus, _tcp(contract.SERVE_HTTP_PORT))]
    return network_policy("InferenceService", name, namespace, uid, "server", ingress)
