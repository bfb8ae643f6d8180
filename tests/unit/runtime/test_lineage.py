"""kubeforge_runtime.lineage on its own: digests, sealing, the nested chain, the model card.

No model is loaded: the files are bytes, the records JSON. The trainer and quantizer tests
(tests/unit/runtime/train/test_train_lineage.py) check what they write with these functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kubeforge_runtime import lineage


def model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    return path


def test_files_digest_changes_with_one_byte_of_any_model_file_and_ignores_the_audit_files(tmp_path: Path) -> None:
    d = model_dir(tmp_path / "m")
    first = lineage.model_files_digest(d)
    assert set(first["files"]) == {"model.safetensors", "config.json", "tokenizer.json"}

    # The files that describe the model are not part of it (they are written after the digest).
    (d / "README.md").write_text("# card")
    (d / "kubeforge.json").write_text("{}")
    (d / "quantization-report.json").write_text("{}")
    assert lineage.model_files_digest(d) == first

    weights = bytearray((d / "model.safetensors").read_bytes())
    weights[5000] ^= 1
    (d / "model.safetensors").write_bytes(bytes(weights))
    changed = lineage.model_files_digest(d)
    assert changed["digest"] != first["digest"]
    assert changed["files"]["model.safetensors"] != first["files"]["model.safetensors"]
    assert changed["files"]["config.json"] == first["files"]["config.json"]

    # A renamed file changes it too (the path is hashed with the content).
    (d / "tokenizer.json").rename(d / "tokenizer2.json")
    assert lineage.model_files_digest(d)["digest"] != changed["digest"]


def record(**over: Any) -> dict[str, Any]:
    base = {"kind": "FineTuneJob", "name": "ft", "namespace": "default", "createdAt": "2026-01-01T00:00:00+00:00",
            "baseModel": {"uri": "hf://org/base", "digest": "sha256:aa"},
            "dataset": {"uri": "pvc://data/train.jsonl", "digest": "sha256:bb", "redactedDigest": "sha256:cc",
                        "format": "prompt-completion", "trainRecords": 10, "validationRecords": 2,
                        "redactions": {"email": 3}},
            "method": "lora", "format": "merged", "steps": 8, "finalLoss": 1.5,
            "initialValidationLoss": 2.0, "finalValidationLoss": 1.2,
            "evaluation": {"metric": "accuracy", "before": 0.36, "after": 0.95, "samples": 100},
            "configDigest": "sha256:dd", "code": {"package": "kubeforge", "version": "0.1.0", "commit": "abc"}}
    base.update(over)
    return base


def test_seal_is_reproducible_ignores_the_clock_and_covers_every_input() -> None:
    a = lineage.seal(record())
    assert a["digest"].startswith("sha256:") and lineage.verify(a) == []
    assert lineage.seal(record(createdAt="2027-05-05T00:00:00+00:00"))["digest"] == a["digest"]
    for changed in (record(dataset={**record()["dataset"], "redactedDigest": "sha256:c0"}),
                    record(baseModel={"uri": "hf://org/base", "digest": "sha256:ab"}),
                    record(configDigest="sha256:de"), record(finalValidationLoss=1.3)):
        assert lineage.seal(changed)["digest"] != a["digest"]
    tampered = dict(a, steps=9)
    assert lineage.verify(tampered) and "does not match" in lineage.verify(tampered)[0]
    # NaN is not JSON: it is sealed (and written) as null.
    assert lineage.seal(record(finalLoss=float("nan")))["finalLoss"] is None


def test_the_chain_nests_the_input_record_and_verifies_each_level(tmp_path: Path) -> None:
    ft_dir = model_dir(tmp_path / "ft")
    ft = lineage.seal(record())
    lineage.write(ft_dir, ft)
    qj = lineage.seal({"kind": "QuantizeJob", "name": "q", "namespace": "default", "gatePassed": True,
                       "baseModel": {"uri": "pvc://models/ft", **lineage.model_files_digest(ft_dir)}},
                      input_dir=ft_dir)
    assert qj["input"] == ft
    assert [r["name"] for r in lineage.chain(qj)] == ["ft", "q"]
    assert lineage.verify(qj) == []
    # The parent record is inside the child's sealed content: changing it breaks both levels.
    broken = json.loads(json.dumps(qj))
    broken["input"]["dataset"]["redactedDigest"] = "sha256:ff"
    problems = lineage.verify(broken)
    assert [p.split(":")[0] for p in problems] == ["FineTuneJob/ft", "QuantizeJob/q"]
    broken["input"]["digest"] = lineage.record_digest(broken["input"])  # re-sealing the parent alone...
    assert [p.split(":")[0] for p in lineage.verify(broken)] == ["QuantizeJob/q"]  # ...is caught by the child


def test_model_card_has_front_matter_data_method_metrics_gate_and_limits(tmp_path: Path) -> None:
    ft = lineage.seal(record())
    q = lineage.seal({"kind": "QuantizeJob", "name": "q8", "namespace": "default", "input": ft, "gatePassed": True,
                      "quantization": {"method": "int8-weight-only", "originalDtype": "float32", "device": "cpu"},
                      "perplexity": {"before": 10.0, "after": 10.1}, "size": {"before": 400, "after": 130},
                      "evaluation": {"metric": "accuracy", "before": 0.95, "after": 0.95, "samples": 100}})
    path = lineage.write_model_card(tmp_path, q, license="apache-2.0")
    text = path.read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["base_model"] == "org/base"
    assert front["datasets"] == ["pvc://data/train.jsonl"]
    assert {"kubeforge", "fine-tuned", "lora", "quantized", "int8-weight-only"} <= set(front["tags"])
    for needed in ("## Fine-tuning (ft)", "### Data", "### Method", "### Metrics", "## Quantization (q8)",
                   "## Limits", "| accuracy (task, 100 samples) | 0.36 | 0.95 |", "| perplexity | 10 | 10.1 |",
                   "quality gate: passed", q["digest"], "email=3", "sha256:cc"):
        assert needed in text, needed
    # The license of a base's own card is carried over.
    assert lineage.base_license(tmp_path) == "apache-2.0"
    assert lineage.base_license(tmp_path / "nowhere") is None


def test_records_digest_is_order_and_content_sensitive() -> None:
    a = lineage.records_digest([{"text": "a"}, {"text": "b"}])
    assert a == lineage.records_digest([{"text": "a"}, {"text": "b"}])
    assert a != lineage.records_digest([{"text": "b"}, {"text": "a"}])
    assert a != lineage.records_digest([{"text": "a"}, {"text": "c"}])


def test_code_version_names_the_package_and_a_commit_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(lineage.ENV_GIT_COMMIT, "0123456789abcdef")
    code = lineage.code_version()
    assert code["package"] == "kubeforge" and code["version"] and code["commit"] == "0123456789abcdef"


def test_an_unsealed_base_description_nests_covered_by_the_childs_digest(tmp_path: Path) -> None:
    base = model_dir(tmp_path / "base")
    (base / lineage.LINEAGE_FILE).write_text(json.dumps(  # as kubeforge_runtime.embedded writes it
        {"kind": "EmbeddedModel", "name": "SmolLM2-135M-Instruct", "license": "Apache-2.0",
         "baseModel": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "gguf"}}))
    ft = lineage.seal(record(baseModel={"uri": "pvc://models/base", **lineage.model_files_digest(base)}),
                      input_dir=base)
    assert ft["input"]["kind"] == "EmbeddedModel" and lineage.verify(ft) == []
    tampered = json.loads(json.dumps(ft))
    tampered["input"]["baseModel"]["revision"] = "other"
    assert [p.split(":")[0] for p in lineage.verify(tampered)] == ["FineTuneJob/ft"]
    assert lineage.verify({k: v for k, v in ft.items() if k != "digest"}), "the outer record must be sealed"
    assert lineage.base_license(base) == "apache-2.0"
    front = yaml.safe_load(lineage.model_card(ft).split("---\n")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
