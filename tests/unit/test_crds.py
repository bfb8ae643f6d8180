"""The CRDs in crds/ are exactly what the models generate, and are structural and documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubeforge.api import KINDS, FineTuneJobSpec, InferenceServiceSpec, QuantizeJobSpec
from kubeforge.api.crd import all_crds, render

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["metadata"]["name"])
def test_crd_files_match_models(crd):
    path = REPO / "crds" / f"{crd['metadata']['name']}.yaml"
    assert path.exists(), f"{path} missing: run python -m kubeforge.api.crd --write crds/"
    assert path.read_text() == render(crd), (
        f"{path} drifted from the models: run `python -m kubeforge.api.crd --write crds/` and review the diff"
    )


def test_no_stray_crd_files():
    expected = {f"{c['metadata']['name']}.yaml" for c in all_crds()}
    assert {p.name for p in (REPO / "crds").glob("*.yaml")} == expected


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.get("properties", {}).items():
            yield from _walk(v, f"{path}.{k}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["metadata"]["name"])
def test_schema_is_structural_and_documented(crd):
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    assert "$ref" not in text and "$defs" not in text and "title:" not in text
    for path, node in _walk(schema):
        if node.get("x-kubernetes-int-or-string"):
            continue
        assert "type" in node, f"{path} has no type"
        assert "anyOf" not in node and "oneOf" not in node, f"{path} is not structural"
        if path.startswith(("$.spec.", "$.status.")) and path.count(".") >= 2 and not path.endswith("[]") \
                and not path.endswith("}"):
            assert node.get("description"), f"{path} has no description"
    assert version["subresources"] == {"status": {}}
    cols = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Age"} <= cols and cols & {"Progress", "URL", "Ratio"}
    assert crd["spec"]["names"]["categories"] == ["kubeforge"]
    assert crd["spec"]["names"]["shortNames"]


def test_every_model_field_has_a_description():
    seen = set()

    def check(model):
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            for arg in getattr(field.annotation, "__args__", ()) + (field.annotation,):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    check(arg)

    for kind in KINDS:
        check(kind.spec_model)
        check(kind.status_model)


def test_cel_rules_present_for_cross_field_checks():
    text = "".join(render(c) for c in all_crds())
    for rule in ("self.min <= self.max", "self.parallelism.tensor * self.parallelism.pipeline",
                 "has(self.uri) != has(self.fineTuneJobRef)", "has(self.quantizeJobRef)"):
        assert rule in text, rule


def test_models_reject_what_cel_rejects():
    base = {"model": {"uri": "hf://a/b"}, "dataset": {"uri": "pvc://d/t.jsonl"}, "output": {"uri": "pvc://m/o"}}
    FineTuneJobSpec.model_validate(base)
    with pytest.raises(ValueError, match="nodes.min must be less"):
        FineTuneJobSpec.model_validate({**base, "nodes": {"min": 3, "max": 2}})
    with pytest.raises(ValueError, match="must divide the world size"):
        FineTuneJobSpec.model_validate({**base, "procsPerNode": 3, "nodes": {"min": 1, "max": 2},
                                        "parallelism": {"tensor": 2}})
    # Fixed node count: the world size (3 × 2) divides by 2 even though procsPerNode does not.
    FineTuneJobSpec.model_validate({**base, "procsPerNode": 3, "nodes": {"min": 2, "max": 2},
                                    "parallelism": {"tensor": 2}})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        FineTuneJobSpec.model_validate({**base, "bogus": 1})
    with pytest.raises(ValueError, match="DeepSpeed ZeRO strategies run data parallel only"):
        FineTuneJobSpec.model_validate({**base, "procsPerNode": 2, "parallelism": {"strategy": "deepspeed-zero3", "tensor": 2}})
    with pytest.raises(ValueError, match="DeepSpeed ZeRO strategies train in bf16 or fp32"):
        FineTuneJobSpec.model_validate({**base, "parallelism": {"strategy": "deepspeed-zero2"},
                                        "training": {"precision": "fp16"}})
    FineTuneJobSpec.model_validate({**base, "parallelism": {"strategy": "deepspeed-zero2"}})
    with pytest.raises(ValueError, match="dataset.checks.maxLabelImbalance needs labels"):
        FineTuneJobSpec.model_validate({**base, "dataset": {"uri": "pvc://d/t.jsonl", "checks": {"maxLabelImbalance": 2}}})
    FineTuneJobSpec.model_validate({**base, "dataset": {"uri": "pvc://d/t.jsonl", "format": "chat",
                                                        "checks": {"maxLabelImbalance": 2}}})
    with pytest.raises(ValueError, match="exactly one of uri or fineTuneJobRef"):
        QuantizeJobSpec.model_validate({"model": {"uri": "pvc://m/a", "fineTuneJobRef": {"name": "x"}},
                                        "output": {"uri": "pvc://m/q"}})
    with pytest.raises(ValueError, match="exactly one of uri, fineTuneJobRef or quantizeJobRef"):
        InferenceServiceSpec.model_validate({"model": {}})
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        FineTuneJobSpec.model_validate({**base, "resources": {"memory": "lots"}})
    assert FineTuneJobSpec.model_validate({**base, "resources": {"cpu": 2}}).resources.cpu == "2"
