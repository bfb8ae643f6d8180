"""The lineage the trainer and the quantizer write, end to end on the tiny model.

A real single-process training run (``python -m kubeforge_runtime.train``, as the pod runs
it) writes its output; the real quantizer (``python -m kubeforge_runtime.quantize``) reads it
and writes its own; ``kubeforge audit --dir`` then prints the chain from the files alone.
The dataset digests are checked on ``data.prepare``, which every rank calls.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from train_support import DATA, Run, child_env

from kubeforge_runtime import data as D
from kubeforge_runtime import lineage, models, pii


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    return models.load_tokenizer(tiny_model)


ROWS = [{"prompt": f"Ticket {i} from ops{i}@example.com:", "completion": f" closed as case {i}."} for i in range(20)]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_dataset_digest_is_of_the_data_after_redaction(tok, tmp_path: Path) -> None:
    def prep(path: Path) -> D.TokenizedData:
        return D.prepare(tok, path, "prompt-completion", 32, False, validation_split=0.2, seed=1,
                         redact=["email"])

    a = prep(write(tmp_path / "a.jsonl", ROWS))
    assert a.redacted_digest.startswith("sha256:")
    assert prep(write(tmp_path / "a2.jsonl", ROWS)).redacted_digest == a.redacted_digest, "a function of the data"

    # One byte of trained text: both digests change.
    raw = (tmp_path / "a.jsonl").read_bytes()
    i = raw.index(b"closed as case 7")
    b_path = tmp_path / "b.jsonl"
    b_path.write_bytes(raw[:i] + b"C" + raw[i + 1:])
    b = prep(b_path)
    assert b.digest != a.digest and b.redacted_digest != a.redacted_digest

    # Only the redacted personal data differs: the file differs, what was trained on does not.
    other = [dict(r, prompt=r["prompt"].replace("ops", "help")) for r in ROWS]
    c = prep(write(tmp_path / "c.jsonl", other))
    assert c.digest != a.digest and c.redacted_digest == a.redacted_digest

    # Without redaction the personal data is trained on, so it is in the digest.
    plain = D.prepare(tok, tmp_path / "a.jsonl", "prompt-completion", 32, False, validation_split=0.2, seed=1)
    assert plain.redacted_digest != a.redacted_digest
    assert set(pii.ALL_KINDS) >= {"email"}


@pytest.fixture(scope="module")
def trained(launcher: Callable[..., Run], tiny_model: Path) -> Run:
    # A base with a model card carrying a license, as a Hub model would have.
    (tiny_model / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return launcher("lineage-lora", {"method": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj"]},
                                     "dataset": {"redact": ["email"]}},
                    env={"KUBEFORGE_REPORT_PATH": "result.json", "KUBEFORGE_GIT_COMMIT": "feedface"}, dump=False)


def test_the_trainer_seals_its_output_with_the_digests_of_its_inputs(trained: Run, tiny_model: Path) -> None:
    record = lineage.read(trained.out)
    assert record is not None and lineage.verify(record) == []
    assert record["kind"] == "FineTuneJob" and record["name"] == "test"
    assert record["baseModel"]["digest"] == lineage.model_files_digest(tiny_model)["digest"]
    assert record["output"]["digest"] == lineage.model_files_digest(trained.out)["digest"]
    assert record["dataset"]["digest"] == D.file_digest(DATA / "text.jsonl")
    assert record["dataset"]["redactedDigest"].startswith("sha256:")
    from kubeforge_runtime.train.config import parse_config

    config = parse_config(json.loads((trained.dir / "config.json").read_text()))
    assert record["configDigest"] == lineage.json_digest(config.to_dict())
    assert record["code"] == {"package": "kubeforge", "version": record["code"]["version"], "commit": "feedface"}
    assert "input" not in record, "the tiny base has no lineage record of its own"
    # The result the operator copies into status.result names the same digest.
    result = json.loads((trained.dir / "result.json").read_text())
    assert result["lineageDigest"] == record["digest"]
    # The model card: front matter, data, method, metrics, limits.
    card = (trained.out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "license: \"apache-2.0\"" in front and "\"lora\"" in front and "datasets:" in front
    for needed in ("### Data", "### Method", "### Metrics", "| validation loss |", "## Limits", record["digest"]):
        assert needed in card, needed


def test_the_quantizer_nests_the_fine_tune_and_audit_prints_the_chain(trained: Run, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "int8"
    cfg = {"kind": "QuantizeJob", "name": "q8", "namespace": "default", "model": {"uri": f"file://{trained.out}"},
           "method": "int8-weight-only",
           "evaluation": {"uri": f"file://{DATA / 'text.jsonl'}", "maxPerplexityIncreasePercent": 50,
                          "maxSamples": 8, "sequenceLength": 32},
           "output": {"uri": f"file://{out}"}}
    (tmp_path / "q.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "kubeforge_runtime.quantize", "--config", str(tmp_path / "q.json")],
                          env=child_env(KUBEFORGE_REPORT_PATH=str(tmp_path / "report.json")), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = lineage.read(out)
    assert record is not None and lineage.verify(record) == []
    assert record["input"] == lineage.read(trained.out), "the fine-tune's record, nested whole"
    assert [r["kind"] for r in lineage.chain(record)] == ["FineTuneJob", "QuantizeJob"]
    assert record["baseModel"]["digest"] == record["input"]["output"]["digest"], "input files = fine-tune output"
    assert record["evaluationData"]["digest"].startswith("sha256:")
    assert json.loads((tmp_path / "report.json").read_text())["lineageDigest"] == record["digest"]
    card = (out / "README.md").read_text()
    assert "## Fine-tuning (test)" in card and "## Quantization (q8)" in card and "license: \"apache-2.0\"" in card

    from kubeforge.cli import main

    assert main(["audit", "--dir", str(out), "--full"]) == 0
    text = capsys.readouterr().out
    assert text.index("FineTuneJob default/test") < text.index("QuantizeJob default/q8")
    assert record["digest"] in text and record["input"]["digest"] in text
    assert record["input"]["dataset"]["redactedDigest"] in text and text.count("digests verified") == 2

    assert main(["audit", "--dir", str(out), "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["kind"] == "FineTuneJob" and tree["children"][0]["lineageDigest"] == record["digest"]

    # A changed weight byte in the output: audit says so and exits 1.
    weights = next(out.glob("*.safetensors"), None) or next(out.glob("*.bin"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    assert main(["audit", "--dir", str(out)]) == 1
    assert "are not the ones sealed" in capsys.readouterr().out
