"""s3:// through storage.py against a real S3-protocol server (moto's server mode, in-process).

Downloads (a model prefix to a directory, a dataset key to that one file), uploads with the
completeness marker last, and refused object keys that would write outside the target.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from kubeforge_runtime import storage  # noqa: E402
from support.s3server import moto_server, s3_env  # noqa: E402


@pytest.fixture(scope="module")
def endpoint():
    with moto_server() as url:
        yield url


@pytest.fixture
def s3(endpoint, monkeypatch, tmp_path):
    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"b{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def test_prefix_downloads_to_directory_and_key_to_file(s3, tmp_path):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="models/m/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="models/m/sub/w.bin", Body=b"w")
    client.put_object(Bucket=bucket, Key="models/m2/other.json", Body=b"x")  # a sibling prefix, not ours
    client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"text": "hi"}\n')
    model = storage.resolve(f"s3://{bucket}/models/m")
    assert model.is_dir()
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()) == ["config.json", "sub/w.bin"]
    data = storage.resolve(f"s3://{bucket}/data/train.jsonl")
    assert data.is_file() and data.read_bytes() == b'{"text": "hi"}\n'


def test_traversal_key_is_refused_and_nothing_written_outside(s3, tmp_path):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="models/m/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="models/m/../../evil", Body=b"pwned")  # S3 keeps the key verbatim
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(storage.StorageError, match=r"models/m/\.\./\.\./evil"):
        storage.resolve(f"s3://{bucket}/models/m")
    written = {p for p in tmp_path.rglob("*")} - before
    assert not any(p.name == "evil" for p in tmp_path.parent.rglob("evil")), "a file escaped the target"
    assert not any(p.is_file() for p in written), f"nothing is downloaded once a key is refused: {written}"


@pytest.mark.parametrize("key", ["a/../b", "/abs", "a\\b", "a//b", "./a"])
def test_unsafe_keys(key):
    with pytest.raises(storage.StorageError, match="refused"):
        storage.safe_relative_key(key, "")


def test_missing_prefix_is_a_config_error(s3):
    _, bucket = s3
    with pytest.raises(storage.StorageError, match="no objects"):
        storage.resolve(f"s3://{bucket}/nothing/here")


def test_upload_dir_puts_marker_last_and_replaces_stale_one(s3, tmp_path, monkeypatch):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="out/kubeforge.json", Body=b"old")
    local = tmp_path / "local"
    (local / "checkpoints").mkdir(parents=True)
    (local / "model.safetensors").write_bytes(b"w")
    (local / "kubeforge.json").write_text("new")
    (local / "checkpoints" / "x").write_text("skip me")
    order: list[str] = []
    real = storage.s3_client

    def recording_client():
        c = real()
        orig = c.upload_file
        c.upload_file = lambda path, b, key: (order.append(key), orig(path, b, key))[1]
        return c

    monkeypatch.setattr(storage, "s3_client", recording_client)
    storage.upload_dir(local, f"s3://{bucket}/out", last=("kubeforge.json",), skip=("checkpoints",))
    assert order == ["out/model.safetensors", "out/kubeforge.json"]
    assert client.get_object(Bucket=bucket, Key="out/kubeforge.json")["Body"].read() == b"new"


def test_upload_failure_is_a_runtime_error(s3, tmp_path, monkeypatch):
    _, bucket = s3
    monkeypatch.setattr(storage, "DOWNLOAD_BACKOFF_S", 0.0)
    local = tmp_path / "local"
    local.mkdir()
    (local / "w").write_bytes(b"w")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: connection refused
    with pytest.raises(storage.DownloadFailed, match="upload failed after 4 tries"):
        storage.upload_dir(local, f"s3://{bucket}/out")


def test_a_second_resolve_fetches_only_what_changed(s3, monkeypatch):
    """The preflight and every rank of a node resolve the same URIs: an unchanged object is not
    fetched again; one rewritten in the bucket is."""
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="models/m/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="models/m/w.bin", Body=b"w1")
    storage.resolve(f"s3://{bucket}/models/m")
    fetched: list[str] = []
    real = storage.s3_client

    def counting_client():
        c = real()
        orig = c.download_file
        c.download_file = lambda b, key, path: (fetched.append(key), orig(b, key, path))[1]
        return c

    monkeypatch.setattr(storage, "s3_client", counting_client)
    storage.resolve(f"s3://{bucket}/models/m")
    assert fetched == []
    import time

    time.sleep(1.1)  # S3 modification times have one-second resolution
    client.put_object(Bucket=bucket, Key="models/m/w.bin", Body=b"w2")
    path = storage.resolve(f"s3://{bucket}/models/m")
    assert fetched == ["models/m/w.bin"] and (path / "w.bin").read_bytes() == b"w2"
