"""Reading the generated CRDs in tests."""

from __future__ import annotations

from typing import Any

from kubeforge.api.crd import all_crds


def cel_rules(kind: str) -> str:
    """Every CEL rule and message of ``kind``'s CRD, one per line."""
    (crd,) = [c for c in all_crds() if c["spec"]["names"]["kind"] == kind]
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []):
                out.extend(str(v) for v in rule.values())
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(crd)
    return "\n".join(out)
