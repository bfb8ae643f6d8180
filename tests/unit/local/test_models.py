"""Which model a local run uses: the embedded real model where documented, the user's model
where given, and a clear error otherwise (never a silently substituted random model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from kubeforge.local.runner import EMBEDDED_BASE_URI, LocalRunError, LocalRunner, sample_prompts
from kubeforge.sdk import DEFAULT_BASE_MODEL, FineTuner
from kubeforge_runtime import embedded


def runner(tmp_path: Path, **kwargs) -> LocalRunner:
    return LocalRunner(tmp_path / "run", console=Console(file=open("/dev/null", "w")), progress=False, **kwargs)


def test_a_missing_model_is_an_error_naming_what_was_looked_for(tmp_path: Path):
    r = runner(tmp_path)
    missing = tmp_path / "no-such-model"
    with pytest.raises(LocalRunError) as err:
        r._ensure_model(f"file://{missing}")
    message = str(err.value)
    assert str(missing) in message and "config.json" in message and "--model" in message
    assert not missing.exists()  # nothing was built there
    with pytest.raises(LocalRunError, match="pvc://models/other"):
        r._ensure_model("pvc://models/other")


def test_the_sdk_never_substitutes_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    with pytest.raises(LocalRunError, match="no model at"):
        FineTuner(base_model=str(tmp_path / "typo"), training_data=str(data)).run(max_steps=1)
    assert not (tmp_path / "typo").exists()


def test_the_sdk_defaults_to_the_embedded_model_by_its_hub_id():
    doc = FineTuner(training_data="s3://b/train.jsonl", output="s3://b/out").manifest()
    assert doc["spec"]["model"]["uri"] == DEFAULT_BASE_MODEL == "hf://HuggingFaceTB/SmolLM2-135M-Instruct"
    assert doc["spec"]["method"] == "lora"


def test_an_existing_model_and_other_schemes_pass_through(tmp_path: Path):
    r = runner(tmp_path)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert r._ensure_model(f"file://{model}") == f"file://{model}"
    assert r._ensure_model("hf://org/other-model") == "hf://org/other-model"  # the runtime downloads it


def test_model_flag_fills_a_missing_path(tmp_path: Path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    r = runner(tmp_path, model_dir=mine)
    assert r._ensure_model(EMBEDDED_BASE_URI) == EMBEDDED_BASE_URI
    assert (tmp_path / "run" / "pvc" / "models" / "base" / "config.json").exists()


@pytest.mark.skipif(not embedded.is_ready(), reason="the embedded model is converted by hack/setup-python.sh")
def test_the_embedded_model_seeds_the_base_claim_and_resolves_its_hub_id(tmp_path: Path):
    r = runner(tmp_path)
    assert r._ensure_model(EMBEDDED_BASE_URI) == EMBEDDED_BASE_URI
    base = tmp_path / "run" / "pvc" / "models" / "base"
    assert (base / "config.json").exists() and (base / "model.safetensors").exists()
    assert json.loads((base / "kubeforge.json").read_text())["baseModel"]["uri"] == embedded.HUB_URI
    assert r._ensure_model(embedded.HUB_URI) == f"file://{embedded.cache_dir()}"


def test_sample_prompts_annotation():
    doc = {"metadata": {"annotations": {"kubeforge.io/sample-prompts": json.dumps(
        ["Review: fine.\nSentiment:", [{"role": "user", "content": "Hi"}]])}}}
    assert sample_prompts(doc) == ["Review: fine.\nSentiment:", [{"role": "user", "content": "Hi"}]]
    assert len(sample_prompts({"metadata": {}})) == 1
    with pytest.raises(LocalRunError, match="JSON list"):
        sample_prompts({"metadata": {"annotations": {"kubeforge.io/sample-prompts": '{"a": 1}'}}})


def test_the_sdk_passes_the_evaluation_sample_counts_into_the_specs():
    from kubeforge.sdk import Quantizer

    ft = FineTuner(training_data="s3://b/train.jsonl", evaluation_data="s3://b/test.jsonl", output="s3://b/out",
                   data_format="prompt-completion",
                   evaluation_samples=50).manifest()
    assert ft["spec"]["evaluation"]["maxSamples"] == 50
    q = Quantizer(model_path="s3://b/out", output="s3://b/q", task_data="s3://b/test.jsonl", task_samples=40).manifest()
    assert q["spec"]["evaluation"]["task"]["maxSamples"] == 40
    # Unset, the API's defaults apply (the key is absent, not None).
    assert "maxSamples" not in FineTuner(training_data="s3://b/t.jsonl", evaluation_data="s3://b/e.jsonl", data_format="chat",
                                         output="s3://b/o").manifest()["spec"]["evaluation"]
