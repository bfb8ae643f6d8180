"""Read KubeForge resources from YAML and validate them against the API models, offline.

Used by ``kubeforge validate``, ``kubeforge run`` and the SDK. The checks are the models'
own (the same ones the CRD schema and CEL rules encode), so a file that passes here is
accepted by the API server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .api import API_VERSION, KIND_BY_NAME as KIND_TABLE, describe_validation_error
from .api.base import KFModel


class ManifestError(ValueError):
    """A manifest that is not a valid KubeForge resource; the message says where and why."""


@dataclass
class Resource:
    kind: str
    name: str
    namespace: str
    spec: KFModel
    raw: dict[str, Any]


def parse_resource(doc: dict[str, Any], source: str = "<input>") -> Resource:
    kind = doc.get("kind")
    if kind not in KIND_TABLE:
        raise ManifestError(f"{source}: kind {kind!r} is not a KubeForge kind ({', '.join(KIND_TABLE)})")
    if doc.get("apiVersion") != API_VERSION:
        raise ManifestError(f"{source}: apiVersion must be {API_VERSION} (got {doc.get('apiVersion')!r})")
    meta = doc.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise ManifestError(f"{source}: {kind} has no metadata.name")
    try:
        spec = KIND_TABLE[kind].spec_model.model_validate(doc.get("spec") or {})
    except ValidationError as exc:
        raise ManifestError(f"{source}: {kind}/{name}: {describe_validation_error(exc)}") from None
    try:
        KIND_TABLE[kind].validate_object(name, spec)  # rules that need the name too (CRD root CEL)
    except ValueError as exc:
        raise ManifestError(f"{source}: {kind}/{name}: {exc}") from None
    return Resource(kind, name, meta.get("namespace", "default"), spec, doc)


def load_resources(path: str | Path) -> list[Resource]:
    p = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d]
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{p}: {exc}") from None
    return [parse_resource(d, f"{p} (document {i + 1})") for i, d in enumerate(docs)]
