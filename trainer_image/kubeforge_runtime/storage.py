"""Resolve model and data URIs to local paths.

Used by every runtime entry point. Supported schemes:

* ``file:///abs/path`` or a plain path - used as is.
* ``pvc://claim/sub/path`` - a PersistentVolumeClaim the operator mounts at
  ``$KUBEFORGE_PVC_ROOT/<claim>`` (default ``/mnt/pvc``); locally ``kubeforge run`` points
  the root at a directory.
* ``hf://org/name[@revision]`` (or a bare ``org/name`` hub id) - downloaded with
  ``huggingface_hub``. When the hub is unreachable or ``HF_HUB_OFFLINE=1`` is set and the
  model is not in the local cache, this fails at once with a message saying what to do,
  rather than hanging in retries.
* ``s3://bucket/prefix`` - copied with boto3 (the optional ``s3`` extra) into a cache dir.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PVC_ROOT_ENV = "KUBEFORGE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
CACHE_ENV = "KUBEFORGE_CACHE_DIR"


class StorageError(RuntimeError):
    """A URI that cannot be resolved; the message says what to change."""


@dataclass(frozen=True)
class ParsedURI:
    scheme: str  # file | pvc | hf | s3
    location: str  # path, "claim/path", "org/name", "bucket/prefix"
    revision: str | None = None


def parse_uri(uri: str) -> ParsedURI:
    """Split a KubeForge URI into scheme, location and (for hub ids) revision."""
    if not uri:
        raise StorageError("empty URI: give file:///path, pvc://claim/path, hf://org/name or s3://bucket/path")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        if scheme == "file":
            return ParsedURI("file", rest if rest.startswith("/") else "/" + rest)
        if scheme == "pvc":
            if "/" not in rest.strip("/") and not rest.strip("/"):
                raise StorageError(f"{uri!r}: pvc URIs look like pvc://<claim>/<path>")
            return ParsedURI("pvc", rest.strip("/"))
        if scheme == "hf":
            name, _, rev = rest.partition("@")
            if name.count("/") > 1 or not name:
                raise StorageError(f"{uri!r}: hub URIs look like hf://org/name[@revision]")
            return ParsedURI("hf", name, rev or None)
        if scheme == "s3":
            if not rest or rest.startswith("/"):
                raise StorageError(f"{uri!r}: S3 URIs look like s3://bucket/prefix")
            return ParsedURI("s3", rest)
        raise StorageError(f"{uri!r}: unsupported scheme {scheme!r}; use file, pvc, hf or s3")
    path = Path(uri)
    if path.is_absolute() or uri.startswith(".") or path.exists():
        return ParsedURI("file", str(path.resolve()))
    if uri.count("/") == 1:  # org/name: a hub id without the hf:// prefix
        name, _, rev = uri.partition("@")
        return ParsedURI("hf", name, rev or None)
    return ParsedURI("file", str(path.resolve()))


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))


def local_path(uri: str) -> Path:
    """Where a file/pvc URI lives on this machine, without checking that it exists.

    Used for outputs (which do not exist yet). Remote schemes are refused: write outputs to
    a mounted volume and let the operator or a sidecar upload them.
    """
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        return Path(parsed.location)
    if parsed.scheme == "pvc":
        return pvc_root() / parsed.location
    raise StorageError(f"{uri!r}: outputs must be file:// or pvc:// paths (got {parsed.scheme}://)")


def resolve(uri: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a local directory or file holding what ``uri`` names; download if remote."""
    parsed = parse_uri(uri)
    if parsed.scheme in ("file", "pvc"):
        path = local_path(uri)
        if not path.exists():
            hint = f" (is the volume mounted under {pvc_root()}?)" if parsed.scheme == "pvc" else ""
            raise StorageError(f"{uri!r}: {path} does not exist{hint}")
        return path
    cache = Path(cache_dir or os.environ.get(CACHE_ENV, Path.home() / ".cache" / "kubeforge" / "models"))
    if parsed.scheme == "hf":
        return _resolve_hub(parsed, cache)
    return _resolve_s3(parsed, cache)


def _resolve_hub(parsed: ParsedURI, cache: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - transformers always brings it
        raise StorageError("hub ids need huggingface_hub (pip install huggingface_hub)") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    kwargs = dict(repo_id=parsed.location, revision=parsed.revision, cache_dir=str(cache / "hub"))
    try:
        # Try the local cache first: it never touches the network.
        return Path(snapshot_download(local_files_only=True, **kwargs))
    except LocalEntryNotFoundError:
        if offline:
            raise StorageError(
                f"hf://{parsed.location}: not in the local cache and HF_HUB_OFFLINE is set; "
                "copy the model to a volume and use pvc://claim/path or file:///path instead"
            ) from None
    except Exception:  # pragma: no cover - unusual cache states fall through to download
        pass
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return Path(snapshot_download(**kwargs))
    except Exception as exc:
        raise StorageError(
            f"hf://{parsed.location}: download failed ({type(exc).__name__}: {exc}); if this "
            "cluster has no internet access, copy the model to a volume and use pvc:// or file://"
        ) from None


def _resolve_s3(parsed: ParsedURI, cache: Path) -> Path:
    try:
        import boto3  # type: ignore[import-not-found]
    except ImportError as exc:
        raise StorageError("s3:// URIs need the s3 extra: pip install 'kubeforge[s3]'") from exc
    bucket, _, prefix = parsed.location.partition("/")
    target = cache / "s3" / bucket / prefix
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    paginator = client.get_paginator("list_objects_v2")
    found = False
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found = True
            rel = obj["Key"][len(prefix):].lstrip("/") or Path(obj["Key"]).name
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(dest))
    if not found:
        raise StorageError(f"s3://{parsed.location}: no objects under that prefix")
    return target
