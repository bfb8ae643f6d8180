"""The config contract, one test per kind: the API's sub-models render into the runtime's model.

The operator renders parts of each spec, unchanged in shape, into the config file its pod reads
(``builders/*.py``: ``model_dump(by_alias=True)``); the runtime parses it with its own strict
pydantic model (``kubeforge_runtime/{train,quantize,serve}/config.py``), which must not import
the control plane. So the schema exists twice, and these tests are what keeps the two equal:

* a maximal spec (every field of the rendered parts set, which the test checks, so a new API
  field fails here until it is added) and a minimal one go through the builder and JSON, and
  the runtime parses them back to the same values;
* the JSON schemas of the rendered parts are compared field by field: the same keys, types,
  nullability, enums, numeric bounds and list lengths on both sides (an ``int`` against a
  ``float``, or another ``le``, fails). Not compared: descriptions, defaults (the builder
  writes every value out; the runtime's defaults serve hand-written configs) and string
  spelling (the API constrains URIs and names by patterns; the runtime also takes plain paths
  for local runs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from pydantic import BaseModel, Field

from kubeforge.api import FineTuneJobSpec, InferenceServiceSpec, QuantizeJobSpec
from kubeforge.builders import finetune as fb
from kubeforge.builders import inference as ib
from kubeforge.builders import quantize as qb
from kubeforge_runtime.quantize import config as qconfig
from kubeforge_runtime.serve import config as sconfig
from kubeforge_runtime.train import config as tconfig

# --- comparing schemas -----------------------------------------------------------------------------

_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems")


def facts(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """What a JSON schema node says about the values it accepts, minus spelling and prose."""
    if "$ref" in node:
        node = {**defs[node["$ref"].split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    out: dict[str, Any] = {"nullable": False}
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        out["nullable"] = len(options) < len(node["anyOf"])
        if len(options) == 1:
            inner = facts(options[0], defs)
            inner["nullable"] = out["nullable"]
            return inner
        out["anyOf"] = [facts(o, defs) for o in options]
    for key in ("type", *_BOUNDS):
        if key in node:
            out[key] = node[key]
    if "enum" in node:
        out["enum"] = sorted(node["enum"], key=repr)
    if "const" in node:
        out["enum"] = [node["const"]]
    if "items" in node:
        out["items"] = facts(node["items"], defs)
    if "properties" in node:
        out["properties"] = {k: facts(v, defs) for k, v in node["properties"].items()}
    return out


def differences(api: dict[str, Any], runtime: dict[str, Any], path: str = "") -> list[str]:
    """Human-readable differences between two ``facts`` trees."""
    out = []
    for key in sorted(set(api) | set(runtime)):
        if key == "properties":
            a, r = api.get(key, {}), runtime.get(key, {})
            for name in sorted(set(a) - set(r)):
                out.append(f"{path}.{name}: in the API only")
            for name in sorted(set(r) - set(a)):
                out.append(f"{path}.{name}: in the runtime only")
            for name in sorted(set(a) & set(r)):
                out += differences(a[name], r[name], f"{path}.{name}" if path else name)
        elif key == "items" and key in api and key in runtime:
            out += differences(api[key], runtime[key], f"{path}[]")
        elif api.get(key) != runtime.get(key):
            out.append(f"{path or '<root>'}: {key} {api.get(key)!r} (API) != {runtime.get(key)!r} (runtime)")
    return out


def schema_facts(model: type[BaseModel], keys: set[str] | None = None, drop: set[str] = frozenset()) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    top = facts(schema, schema.get("$defs", {}))
    props = {k: v for k, v in top["properties"].items() if (keys is None or k in keys) and k not in drop}
    return {"type": "object", "properties": props}


# --- the kinds ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    api: type[BaseModel]
    rendered: frozenset[str]
    """The spec fields (Python names) the builder renders as they are."""
    runtime: type[BaseModel]
    runtime_only: frozenset[str]
    """Keys of the runtime config the operator fills in itself (names, the resolved model, ports)."""
    render: Callable[[Any], dict[str, Any]]
    parse: Callable[[Any], BaseModel]
    dump: Callable[[BaseModel], dict[str, Any]]
    maximal: dict[str, Any]
    minimal: dict[str, Any]

    def api_keys(self) -> set[str]:
        return {self.api.model_fields[f].alias or f for f in self.rendered}


FINETUNE = Kind(
    api=FineTuneJobSpec, rendered=frozenset(fb._CONFIG_FIELDS), runtime=tconfig.TrainConfig,
    # distillation: the builder writes the teacher as a URI (a fineTuneJobRef resolved), so it
    # is compared on its own below (test_distillation_renders_with_the_resolved_teacher).
    runtime_only=frozenset({"kind", "name", "namespace", "distillation"}),
    render=lambda spec: fb.render_config("ft", "ns", spec), parse=tconfig.parse_config,
    dump=lambda cfg: cfg.model_dump(mode="json", exclude={"distillation"} if cfg.distillation is None else None),
    maximal={
        "model": {"uri": "pvc://models/base"},
        "dataset": {"uri": "pvc://data/train.jsonl", "format": "chat", "validationUri": "pvc://data/val.jsonl",
                    "validationSplit": 0.2, "sequenceLength": 1024, "packing": False,
                    "redact": ["email", "phone", "ipAddress", "creditCard", "idNumber"], "checks": {"maxUnparseableShare": 0.01, "maxDuplicateShare": 0.05, "maxLabelImbalance": 4.0,
                               "minRecords": 100, "maxOverlongShare": 0.1, "maxPiiShare": 0.02}},
        "method": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["q_proj", "v_proj"]},
        "parallelism": {"tensor": 2, "pipeline": 2, "strategy": "fsdp", "pipelineSchedule": "GPipe"},
        "procsPerNode": 4,
        "training": {"epochs": 2, "maxSteps": 50, "globalBatchSize": 16, "microBatchSize": 2, "learningRate": 2e-4,
                     "warmupSteps": 5, "weightDecay": 0.01, "maxGradNorm": 0.5, "seed": 7, "precision": "bf16",
                     "gradientCheckpointing": True, "evalIntervalSteps": 10, "attention": "sdpa", "compile": "on",
                     "fused": "off", "mergedProjections": "off"},
        "checkpoint": {"intervalSteps": 0, "keepLast": 3, "uri": "pvc://scratch/ckpt"},
        "output": {"uri": "pvc://models/out", "format": "adapter"},
        "evaluation": {"uri": "pvc://data/test.jsonl", "metric": "f1", "maxSamples": 50},
    },
    minimal={"model": {"uri": "hf://acme/tiny"}, "dataset": {"uri": "s3://data/train.jsonl"},
             "output": {"uri": "s3://models/out"}},
)

QUANTIZE = Kind(
    api=QuantizeJobSpec, rendered=frozenset(qb._CONFIG_FIELDS), runtime=qconfig.QuantizeConfig,
    runtime_only=frozenset({"kind", "name", "namespace", "model"}),
    render=lambda spec: qb.runtime_config("q", "ns", spec, "pvc://models/ft/final"), parse=qconfig.parse_config,
    dump=lambda cfg: cfg.model_dump(by_alias=True, mode="json"),
    maximal={
        "model": {"uri": "pvc://models/base"},
        "method": "int4-weight-only", "groupSize": 64, "quantizeEmbeddings": False,
        "calibration": {"uri": "pvc://data/cal.jsonl", "samples": 32},
        "evaluation": {"uri": "pvc://data/eval.jsonl", "maxPerplexityIncreasePercent": 2.5, "maxSamples": 16,
                       "sequenceLength": 128, "task": {"uri": "pvc://data/test.jsonl", "metric": "exactMatch",
                                                       "maxSamples": 20},
                       "maxAccuracyDropPoints": 1.5},
        "output": {"uri": "pvc://models/q"},
    },
    minimal={"model": {"uri": "s3://bucket/base"}, "output": {"uri": "pvc://models/q"}},
)

INFERENCE = Kind(
    api=InferenceServiceSpec, rendered=frozenset(ib._CONFIG_FIELDS), runtime=sconfig.ServeConfig,
    runtime_only=frozenset({"kind", "name", "namespace", "servedModelName", "model", "port", "grpcPort"}),
    render=lambda spec: ib.serve_config("chat", "ns", spec, ib.ModelRef("pvc://models/ft/final", "r1")),
    parse=sconfig.parse_config, dump=lambda cfg: cfg.model_dump(by_alias=True, mode="json"),
    maximal={
        "model": {"uri": "pvc://models/base"},
        "adapters": [{"name": "sql", "uri": "pvc://adapters/sql"}, {"name": "support", "uri": "s3://adapters/support"}],
        "engine": {"backend": "kubeforge", "batching": "continuous", "dtype": "bfloat16", "maxBatchTokens": 2048, "maxConcurrentRequests": 8,
                   "maxQueuedRequests": 32, "kvBlockSize": 32, "prefixCaching": False, "maxModelLength": 1024,
                   "requestTimeoutSeconds": 2.5,
                   "maxRequestBodyBytes": 4096, "compile": "off"},
    },
    minimal={"model": {"uri": "s3://models/base"}},
)

KINDS = {"FineTuneJob": FINETUNE, "QuantizeJob": QUANTIZE, "InferenceService": INFERENCE}


def unset_fields(model: BaseModel, names: set[str] | None = None, path: str = "") -> list[str]:
    """Fields of ``model`` (only ``names`` at the top) the spec leaves at their defaults."""
    out = []
    for name in names if names is not None else model.model_fields:
        where = f"{path}.{name}" if path else name
        if name not in model.model_fields_set:
            out.append(where)
        value = getattr(model, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, BaseModel):
                out += unset_fields(item, None, where)
    return out


def is_subset(rendered: Any, parsed: Any) -> bool:
    if isinstance(rendered, dict):
        return isinstance(parsed, dict) and all(k in parsed and is_subset(v, parsed[k]) for k, v in rendered.items())
    if isinstance(rendered, list):
        return isinstance(parsed, list) and len(rendered) == len(parsed) and all(map(is_subset, rendered, parsed))
    return rendered == parsed


# --- the tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_api_and_runtime_schemas_agree(kind: Kind):
    api = schema_facts(kind.api, keys=kind.api_keys())
    runtime = schema_facts(kind.runtime, drop=set(kind.runtime_only))
    assert differences(api, runtime) == []


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_maximal_spec_renders_into_a_config_the_runtime_parses_unchanged(kind: Kind):
    spec = kind.api.model_validate(kind.maximal)
    assert unset_fields(spec, set(kind.rendered)) == [], "the maximal spec must set every rendered field"
    rendered = json.loads(json.dumps(kind.render(spec)))  # through JSON, as in the pod
    assert kind.dump(kind.parse(rendered)) == rendered


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_minimal_spec_renders_into_a_config_the_runtime_parses(kind: Kind):
    rendered = json.loads(json.dumps(kind.render(kind.api.model_validate(kind.minimal))))
    assert is_subset(rendered, kind.dump(kind.parse(rendered)))


def test_a_drifted_runtime_field_fails_the_comparison():
    """The comparison itself: the drift the engine settings once had is caught."""

    class DriftedEngine(sconfig.EngineConfig):
        request_timeout_seconds: int = Field(120, ge=1, le=86400)  # type: ignore[assignment]
        max_model_length: int | None = Field(None, ge=2)
        kv_block_size: int = Field(16, ge=4)

    class DriftedServe(sconfig.ServeConfig):
        engine: DriftedEngine = Field(default_factory=DriftedEngine)  # type: ignore[assignment]

    api = schema_facts(InferenceServiceSpec, keys=INFERENCE.api_keys())
    drifted = schema_facts(DriftedServe, drop=set(INFERENCE.runtime_only))
    found = "\n".join(differences(api, drifted))
    assert "engine.requestTimeoutSeconds: type 'number' (API) != 'integer' (runtime)" in found
    assert "engine.requestTimeoutSeconds: exclusiveMinimum 0 (API) != None (runtime)" in found
    assert "engine.maxModelLength: minimum 8 (API) != 2 (runtime)" in found
    assert "engine.kvBlockSize: maximum 1024 (API) != None (runtime)" in found


def test_distillation_renders_with_the_resolved_teacher():
    """The API's teacher (uri or fineTuneJobRef) reaches the runtime as a URI; temperature and
    alpha have the same bounds on both sides."""
    from kubeforge.api.finetune import DistillationSpec

    api = schema_facts(DistillationSpec, drop={"teacher"})
    runtime = schema_facts(tconfig.DistillationConfig, drop={"teacher"})
    assert differences(api, runtime) == []
    by_ref = FineTuneJobSpec.model_validate({**FINETUNE.minimal, "method": "distill", "distillation": {
        "teacher": {"fineTuneJobRef": {"name": "big"}}, "temperature": 3.0, "alpha": 0.25}})
    rendered = json.loads(json.dumps(fb.render_config("ft", "ns", by_ref, "pvc://models/big")))
    cfg = tconfig.parse_config(rendered)
    assert cfg.distillation.model_dump() == {"teacher": {"uri": "pvc://models/big"}, "temperature": 3.0, "alpha": 0.25}
    with pytest.raises(ValueError, match="not resolved yet"):
        fb.render_config("ft", "ns", by_ref)
    by_uri = by_ref.model_copy(update={"distillation": by_ref.distillation.model_copy(
        update={"teacher": type(by_ref.distillation.teacher).model_validate({"uri": "s3://m/teacher"})})})
    assert fb.render_config("ft", "ns", by_uri)["distillation"]["teacher"] == {"uri": "s3://m/teacher"}
