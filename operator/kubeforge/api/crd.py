"""Generate CustomResourceDefinitions from the pydantic models.

``kubeforge crds`` prints them; ``python -m kubeforge.api.crd --write crds/`` regenerates the
files in the repository (a test fails when they drift). pydantic emits JSON Schema 2020-12
with ``$ref``s; Kubernetes wants a *structural* OpenAPI v3 schema, so this module:

* inlines every ``$ref`` (structural schemas forbid references);
* turns ``Optional[X]`` (``anyOf: [X, null]``) into plain ``X`` that is simply not required;
* turns 2020-12 ``exclusiveMinimum: n`` into OpenAPI's ``minimum: n, exclusiveMinimum: true``
  and single-value ``const`` into ``enum``;
* drops ``title`` and ``default: null``; keeps descriptions, enums, bounds, patterns and the
  CEL rules the models carry in ``x-kubernetes-validations``;
* gives each optional object in a spec a default holding its fields' defaults, so CEL rules
  can rely on them being present.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from . import KINDS
from .base import CATEGORY, GROUP, VERSION, Kind, cel

# Worker pods are named <job>-<index> and must stay valid DNS labels (63 characters).
MAX_NAME_LENGTH = 52


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        target.update(siblings)  # a field's own description/default wins over the model's
        return _inline(target, defs)
    return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}


def _structural(node: Any) -> Any:
    if isinstance(node, list):
        return [_structural(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    any_of = node.get("anyOf")
    if any_of and any(s == {"type": "null"} for s in any_of):
        rest = [s for s in any_of if s != {"type": "null"}]
        node.pop("anyOf")
        if len(rest) == 1:
            inner = rest[0]
            outer = {k: v for k, v in node.items()}
            node = dict(inner)
            node.update({k: v for k, v in outer.items() if k in ("description", "default")})
        else:
            node["anyOf"] = rest
    node.pop("title", None)
    if "default" in node and node["default"] is None:
        node.pop("default")
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"] = node.pop("exclusiveMinimum")
        node["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"] = node.pop("exclusiveMaximum")
        node["exclusiveMaximum"] = True
    if node.get("additionalProperties") is False:
        # Structural schemas forbid it; unknown fields are pruned, and rejected outright
        # under field validation Strict (kubectl's default).
        node.pop("additionalProperties")
    out = {}
    for k, v in node.items():
        if k == "properties":
            out[k] = {name: _structural(s) for name, s in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = _structural(v)
        elif k == "anyOf":
            out[k] = [_structural(s) for s in v]
        else:
            out[k] = v
    return out


def _default_empty_objects(node: dict[str, Any]) -> None:
    """Give optional object properties whose fields all have defaults an explicit default.

    The default is the object with every nested default filled in (the API server checks
    defaults against the CEL rules without applying nested defaults first, so ``{}`` would
    not do).
    """
    props = node.get("properties", {})
    required = set(node.get("required", []))
    for name, sub in props.items():
        if sub.get("type") == "object" and "properties" in sub:
            _default_empty_objects(sub)
            if name not in required and not sub.get("required") and "default" not in sub:
                sub["default"] = {k: v["default"] for k, v in sub["properties"].items() if "default" in v}
        elif sub.get("type") == "array" and isinstance(sub.get("items"), dict):
            _default_empty_objects(sub["items"])


def _order(node: Any) -> Any:
    """Stable, readable key order: type and description first."""
    if isinstance(node, list):
        return [_order(x) for x in node]
    if not isinstance(node, dict):
        return node
    first = [k for k in ("type", "description") if k in node]
    rest = sorted(k for k in node if k not in first)
    return {k: _order(node[k]) for k in first + rest}


class _SchemaWithFactoryDefaults(GenerateJsonSchema):
    """pydantic leaves ``default_factory`` values out of JSON Schema; a CRD needs them.

    Lists and dicts (``targetModules``, ``labels``) get their value as ``default``; nested
    models get theirs from :func:`_default_empty_objects`.
    """

    def default_schema(self, schema):  # type: ignore[no-untyped-def]
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            value = factory()
            if not isinstance(value, BaseModel):
                json_schema = self.generate_inner(schema["schema"])
                json_schema["default"] = self.encode_default(value)
                return json_schema
        return super().default_schema(schema)


def model_schema(model: type, *, defaults: bool) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_SchemaWithFactoryDefaults)
    schema = _structural(_inline(raw, raw.get("$defs", {})))
    if defaults:
        _default_empty_objects(schema)
    return _order(schema)


def crd_for(kind: type[Kind]) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    spec = model_schema(kind.spec_model, defaults=True)
    status = model_schema(kind.status_model, defaults=False)
    status.pop("required", None)
    root = {
        "type": "object",
        "description": kind.description,
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object (kubeforge.io/v1alpha1)."},
            "kind": {"type": "string", "description": f"Kind of this object ({kind.kind})."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
        "x-kubernetes-validations": [
            cel(f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
                f"metadata.name must be at most {MAX_NAME_LENGTH} characters (child objects add suffixes)",
                reason="FieldValueInvalid"),
            *kind.object_rules,
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name(), "labels": {"app.kubernetes.io/part-of": "kubeforge"}},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular(),
                "shortNames": list(kind.short_names),
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": kind.printer_columns,
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [crd_for(k) for k in KINDS]


def render(crd: dict[str, Any]) -> str:
    return "# Generated from operator/kubeforge/api by `python -m kubeforge.api.crd --write crds/`. Do not edit.\n" + yaml.safe_dump(
        crd, sort_keys=False, width=100, allow_unicode=True
    )


def render_all() -> str:
    return "---\n".join(render(c) for c in all_crds())


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for crd in all_crds():
        path = directory / f"{crd['metadata']['name']}.yaml"
        path.write_text(render(crd))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate KubeForge CRDs from the API models.")
    parser.add_argument("--write", metavar="DIR", help="write one file per CRD into DIR instead of printing")
    args = parser.parse_args(argv)
    if args.write:
        for p in write(Path(args.write)):
            print(p)
    else:
        sys.stdout.write(render_all())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
