"""A QuantizeJob reading from and writing to S3, against a real S3-protocol server (moto, in-process).

The model and the evaluation file come from the bucket; the output goes up with the lineage
record last, replacing an earlier output's leftovers (another weight file, a rejection
marker); it reads back through the serving loader with the same logits as quantizing the
local copy. An output that overlaps the input on S3 is refused with 78 before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from kubeforge_runtime import contract, models, storage  # noqa: E402
from kubeforge_runtime.quantize import runner  # noqa: E402
from kubeforge_runtime.quantize.methods import get_method  # noqa: E402
from support.s3server import moto_server, s3_env  # noqa: E402

GROUP_SIZE = 64  # as in conftest.py (importing it by name is ambiguous with several conftest.py files)

BUCKET = "kf-quantize"


@pytest.fixture
def s3(tiny_model: Path, eval_jsonl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with moto_server() as url:
        for k, v in s3_env(url).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
        monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket=BUCKET)
        for f in sorted(tiny_model.rglob("*")):
            if f.is_file():
                client.upload_file(str(f), BUCKET, f"models/tiny/{f.relative_to(tiny_model).as_posix()}")
        client.upload_file(str(eval_jsonl), BUCKET, "data/eval.jsonl")
        yield client


def _keys(client, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def test_quantize_from_s3_to_s3(s3, write_config: Callable[..., Path], report_file: Path, tiny_model: Path,
                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An earlier, rejected output at the same place: its leftovers must not survive.
    s3.put_object(Bucket=BUCKET, Key=f"quantized/tiny/{runner.REJECTED_MARKER}", Body=b'{"reason": "old"}')
    s3.put_object(Bucket=BUCKET, Key="quantized/tiny/model-00001-of-00002.safetensors", Body=b"stale")
    evaluation = {"uri": f"s3://{BUCKET}/data/eval.jsonl", "maxPerplexityIncreasePercent": 1.0, "maxSamples": 64,
                  "sequenceLength": 64}
    config = write_config("int8-dynamic", model={"uri": f"s3://{BUCKET}/models/tiny"}, evaluation=evaluation,
                          output={"uri": f"s3://{BUCKET}/quantized/tiny"})
    assert runner.main(["--config", str(config)]) == contract.EXIT_OK, report_file.read_text()
    keys = _keys(s3, "quantized/tiny/")
    assert "quantized/tiny/kubeforge.json" in keys and "quantized/tiny/model.safetensors" in keys, keys
    assert f"quantized/tiny/{runner.REJECTED_MARKER}" not in keys, keys
    assert "quantized/tiny/model-00001-of-00002.safetensors" not in keys, keys

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "reader-cache"))
    out = storage.resolve(f"s3://{BUCKET}/quantized/tiny")
    assert json.loads((out / models.LINEAGE_FILE).read_text())["baseModel"]["uri"] == f"s3://{BUCKET}/models/tiny"
    loaded = models.load_causal_lm(out).eval()
    expected = get_method("int8-dynamic").load_quantized(tiny_model, "cpu", GROUP_SIZE)
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_an_s3_output_overlapping_the_s3_input_is_refused(s3, write_config: Callable[..., Path],
                                                          report_file: Path) -> None:
    config = write_config("int8-dynamic", model={"uri": f"s3://{BUCKET}/models/tiny"},
                          output={"uri": f"s3://{BUCKET}/models/tiny/q"})
    assert runner.main(["--config", str(config)]) == contract.EXIT_CONFIG_ERROR
    assert "overlaps model.uri" in json.loads(report_file.read_text())["message"]
    assert not any("/q/" in k for k in _keys(s3, "models/tiny/"))
