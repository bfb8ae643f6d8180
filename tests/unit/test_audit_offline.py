"""``kubeforge audit`` offline: a ``kubeforge run`` workdir, references, exit codes.

The outputs are model directories of plain bytes with sealed lineage records, laid out as
the local runner lays them out (``<workdir>/<file stem>/pvc/<claim>/<path>``). The chain from
real trainer and quantizer outputs is in tests/unit/runtime/train/test_train_lineage.py; the
cluster path in tests/cluster/test_audit_cluster.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubeforge import audit
from kubeforge.cli import main
from kubeforge_runtime import lineage

RESOURCES = [
    {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "ft"},
     "spec": {"model": {"uri": "pvc://models/base"}, "dataset": {"uri": "pvc://data/train.jsonl"},
              "output": {"uri": "pvc://models/ft"}}},
    {"apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob", "metadata": {"name": "q"},
     "spec": {"model": {"fineTuneJobRef": {"name": "ft"}}, "method": "int8-weight-only",
              "output": {"uri": "pvc://models/q"}}},
    {"apiVersion": "kubeforge.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "svc"},
     "spec": {"model": {"quantizeJobRef": {"name": "q"}}}},
]


def outputs(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    manifest = tmp_path / "main.yaml"
    manifest.write_text(yaml.safe_dump_all(RESOURCES))
    pvc = tmp_path / "runs" / "main" / "pvc" / "models"
    ft_dir, q_dir = pvc / "ft", pvc / "q"
    for d in (ft_dir, q_dir):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(d.name.encode() * 100)
    ft = lineage.seal({"kind": "FineTuneJob", "name": "ft", "namespace": "default", "steps": 8,
                       "dataset": {"uri": "pvc://data/train.jsonl", "digest": "sha256:aa", "redactedDigest": "sha256:bb"},
                       "output": lineage.model_files_digest(ft_dir)})
    lineage.write(ft_dir, ft)
    q = lineage.seal({"kind": "QuantizeJob", "name": "q", "namespace": "default", "gatePassed": True,
                      "perplexity": {"before": 10.0, "after": 10.1}, "output": lineage.model_files_digest(q_dir)},
                     input_dir=ft_dir)
    lineage.write(q_dir, q)
    return manifest, q_dir, ft, q


def test_parse_ref_takes_kinds_plurals_and_short_names() -> None:
    assert audit.parse_ref("finetunejob/a") == ("FineTuneJob", "a")
    assert audit.parse_ref("QuantizeJobs/b") == ("QuantizeJob", "b")
    assert audit.parse_ref("kfis/c") == ("InferenceService", "c")
    for bad in ("finetunejob", "pod/x", "qj/"):
        with pytest.raises(audit.AuditError):
            audit.parse_ref(bad)


def test_a_local_run_is_audited_as_one_chain_from_any_of_its_resources(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    manifest, _, ft, q = outputs(tmp_path)
    for ref in ("inferenceservice/svc", "finetunejob/ft", "qj/q"):
        assert main(["audit", ref, "-f", str(manifest), "--workdir", str(tmp_path / "runs"), "--full"]) == 0
        text = capsys.readouterr().out
        assert text.index("FineTuneJob default/ft") < text.index("QuantizeJob default/q") < text.index(
            "InferenceService default/svc")
        assert f"lineage {ft['digest']}" in text and f"serves lineage {q['digest']}" in text
        assert text.count("digests verified") == 2 and "after redaction sha256:bb" in text
    assert main(["audit", "svc", "-f", str(manifest)]) == 2
    assert "give KIND/NAME" in capsys.readouterr().err


def test_a_changed_output_or_a_missing_record_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest, q_dir, _, _ = outputs(tmp_path)
    (q_dir / "model.safetensors").write_bytes(b"x" * 100)
    assert main(["audit", "qj/q", "-f", str(manifest), "--workdir", str(tmp_path / "runs"), "--json"]) == 1
    tree = json.loads(capsys.readouterr().out)
    assert "are not the ones sealed" in tree["children"][0]["problems"][0]
    (q_dir / "kubeforge.json").unlink()
    assert main(["audit", "qj/q", "-f", str(manifest), "--workdir", str(tmp_path / "runs")]) == 1
    assert "no lineage record" in capsys.readouterr().out
    assert main(["audit", "--dir", str(q_dir)]) == 2
    assert "no readable kubeforge.json" in capsys.readouterr().err
