"""spec.storage.s3: credentials reach the pods by Secret reference only, the endpoint override
as AWS_ENDPOINT_URL, in all three kinds; template.env may not set the same variables."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubeforge.api import FineTuneJobSpec, InferenceServiceSpec, QuantizeJobSpec
from kubeforge.api.crd import all_crds
from kubeforge.builders import finetune as fb
from kubeforge.builders import inference as ib
from kubeforge.builders import quantize as qb
from kubeforge.controllers.webhooks import secret_literals
from kubeforge_runtime import contract

S3 = {"s3": {"credentialsSecretRef": {"name": "minio-creds"}, "endpoint": "http://minio.storage:9000", "region": "eu-west-1"}}
FTJ = {"model": {"uri": "s3://models/base"}, "dataset": {"uri": "s3://data/train.jsonl"},
       "output": {"uri": "s3://models/out"}, "checkpoint": {"uri": "s3://ckpt/run"}}
QJ = {"model": {"uri": "s3://models/out"}, "output": {"uri": "s3://models/int8"}}
ISVC = {"model": {"uri": "s3://models/int8"}}


def _env(kind: str, storage: dict[str, Any] | None) -> list[dict[str, Any]]:
    extra = {"storage": storage} if storage is not None else {}
    if kind == "FineTuneJob":
        job = fb.job("ft", "ns", "uid", FineTuneJobSpec.model_validate({**FTJ, **extra}))
        return job["spec"]["template"]["spec"]["containers"][0]["env"]
    if kind == "QuantizeJob":
        job = qb.build_job("q", "ns", "uid", QuantizeJobSpec.model_validate({**QJ, **extra}), QJ["model"]["uri"])
        return job["spec"]["template"]["spec"]["containers"][0]["env"]
    dep = ib.build_deployment("s", "ns", "uid", InferenceServiceSpec.model_validate({**ISVC, **extra}),
                              ib.ModelRef(ISVC["model"]["uri"], None))
    return dep["spec"]["template"]["spec"]["containers"][0]["env"]


KINDS = ["FineTuneJob", "QuantizeJob", "InferenceService"]


@pytest.mark.parametrize("kind", KINDS)
def test_credentials_by_secret_reference_and_the_endpoint_as_a_value(kind: str) -> None:
    env = {e["name"]: e for e in _env(kind, S3)}
    for key in contract.S3_CREDENTIAL_ENV:
        assert "value" not in env[key], f"{key} must never be a literal"
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "minio-creds" and ref["key"] == key
        assert ref.get("optional", False) == (key == "AWS_SESSION_TOKEN")
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"


@pytest.mark.parametrize("kind", KINDS)
def test_without_storage_no_aws_variables(kind: str) -> None:
    assert not [e for e in _env(kind, None) if e["name"].startswith("AWS_")]


def test_the_rendered_env_passes_the_webhooks_secret_check() -> None:
    spec = {**FTJ, "storage": S3, "template": {"env": [{"name": "OTHER", "value": "x"}]}}
    assert secret_literals(spec) == []


@pytest.mark.parametrize("model, base", [(FineTuneJobSpec, FTJ), (QuantizeJobSpec, QJ), (InferenceServiceSpec, ISVC)])
def test_template_env_may_not_set_what_storage_s3_sets(model: Any, base: dict[str, Any]) -> None:
    clash = {"template": {"env": [{"name": "AWS_ENDPOINT_URL", "value": "http://elsewhere"}]}}
    with pytest.raises(ValidationError, match="AWS_ENDPOINT_URL set from storage.s3"):
        model.model_validate({**base, "storage": S3, **clash})
    model.model_validate({**base, **clash})  # without storage.s3 the template may set it


@pytest.mark.parametrize("endpoint", ["minio:9000", "ftp://x", "http://"])
def test_the_endpoint_must_be_an_http_url(endpoint: str) -> None:
    with pytest.raises(ValidationError):
        FineTuneJobSpec.model_validate({**FTJ, "storage": {"s3": {"credentialsSecretRef": {"name": "c"}, "endpoint": endpoint}}})


def test_inline_credentials_have_no_field() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        FineTuneJobSpec.model_validate({**FTJ, "storage": {"s3": {"credentialsSecretRef": {"name": "c"},
                                                                  "secretAccessKey": "hunter2"}}})


def test_every_crd_carries_the_cel_twin() -> None:
    for crd in all_crds():
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        if "storage" not in spec["properties"]:
            continue
        rules = [r["rule"] for r in spec.get("x-kubernetes-validations", [])]
        assert any("self.storage.s3" in r and "AWS_ENDPOINT_URL" in r for r in rules), crd["metadata"]["name"]
    assert sum("storage" in c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
               for c in all_crds()) == 3
