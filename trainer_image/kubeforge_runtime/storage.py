"""Resolve model and data URIs to local paths.

Used by every runtime entry point. Supported schemes:

* ``file:///abs/path`` or a plain path - used as is.
* ``pvc://claim/sub/path`` - a PersistentVolumeClaim the operator mounts at
  ``$KUBEFORGE_PVC_ROOT/<claim>`` (default ``/mnt/pvc``); locally ``kubeforge run`` points
  the root at a directory.
* ``hf://org/name[@revision]`` (or a bare ``org/name`` hub id) - downloaded with
  ``huggingface_hub``: only the weights (safetensors; ``*.bin`` only where a repository has
  none), configs and tokenizer files (:data:`HUB_ALLOW_PATTERNS`), not every file of the
  repository. When ``HF_HUB_OFFLINE=1`` is set and the model is not in the local cache, this
  fails at once with a message saying what to do.
* ``s3://bucket/prefix`` - copied with boto3 (the optional ``s3`` extra) into a cache dir.

Errors come in two kinds, because the Job treats them differently: a URI that names nothing
(not found, forbidden, gated, unknown revision) is a :class:`StorageError`, a configuration
error (exit 78, no retry); a transient failure (connection refused or reset, timeout, HTTP
408/429/5xx) is retried here :data:`DOWNLOAD_ATTEMPTS` times with exponential back-off and
then raised as :class:`DownloadFailed`, a runtime error (exit 1: the Job's back-off retries
the pod), as is any other failure of a download.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

PVC_ROOT_ENV = "KUBEFORGE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
CACHE_ENV = "KUBEFORGE_CACHE_DIR"


DOWNLOAD_ATTEMPTS = 4
"""Tries of a download whose failure looks transient, before it counts as failed."""
DOWNLOAD_BACKOFF_S = 2.0
"""Wait before the second try; doubled before each further one (2, 4, 8 s)."""

HUB_CONFIG_PATTERNS = ["*.json", "*.jinja", "*.txt", "tokenizer.model", "*.tiktoken", "*.model"]
"""Configs (config.json, generation_config.json, adapter_config.json, ...) and tokenizers."""
HUB_WEIGHT_PATTERNS = ["*.safetensors"]
HUB_PICKLE_WEIGHT_PATTERNS = ["pytorch_model*.bin", "adapter_model.bin"]
"""Fetched only when a repository has no safetensors weights."""
HUB_ALLOW_PATTERNS = HUB_CONFIG_PATTERNS + HUB_WEIGHT_PATTERNS

T = TypeVar("T")


class StorageError(RuntimeError):
    """A URI that cannot be resolved; the message says what to change (a configuration error)."""


class DownloadFailed(RuntimeError):
    """A download failed for a reason that is not the URI's (network, timeout, a server error),
    after the retries: a runtime error, so the Job retries the pod instead of failing at once."""


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


def _hub_error_kind(exc: BaseException) -> str:
    """"config" (the URI names nothing reachable: not found, forbidden, gated, bad revision),
    "transient" (retry: connection, timeout, HTTP 408/429/5xx) or "other". huggingface_hub
    wraps a failed lookup in LocalEntryNotFoundError ``from`` the real error: look through it."""
    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    try:
        import httpx2 as httpx  # what huggingface_hub 1.x/2.x talks through
    except ImportError:  # pragma: no cover - older huggingface_hub
        import httpx
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, LocalEntryNotFoundError) and seen.__cause__ is not None:
            seen = seen.__cause__
            continue
        if isinstance(seen, (RepositoryNotFoundError, RevisionNotFoundError)):
            return "config"
        if isinstance(seen, HfHubHTTPError) and getattr(seen, "response", None) is not None:
            status = seen.response.status_code
            return "transient" if status in (408, 429) or status >= 500 else "config"
        if isinstance(seen, EntryNotFoundError) and not isinstance(seen, LocalEntryNotFoundError):
            return "config"
        if isinstance(seen, (httpx.TransportError, ConnectionError, TimeoutError)):
            return "transient"
        seen = seen.__cause__ or seen.__context__
    return "other"


def with_retries(what: str, fetch: Callable[[], T], kind: Callable[[BaseException], str]) -> T:
    """Call ``fetch``; retry it after a transient failure (``kind(exc) == "transient"``) with
    exponential back-off, :data:`DOWNLOAD_ATTEMPTS` tries in all. A "config" failure raises
    :class:`StorageError` at once; anything else, or the last transient one, :class:`DownloadFailed`."""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return fetch()
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}".strip()
            found = kind(exc)
            if found == "config":
                raise StorageError(f"{what}: {detail}; check the name, the revision and the access token") from None
            if found != "transient" or attempt == DOWNLOAD_ATTEMPTS:
                tries = f" after {attempt} tries" if attempt > 1 else ""
                raise DownloadFailed(f"{what}: download failed{tries} ({detail}); the pod will be retried. If this "
                                     "cluster has no internet access, copy the model to a volume and use pvc:// or "
                                     "file://") from exc
            delay = DOWNLOAD_BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s: transient download failure (%s); try %d of %d in %.0f s",
                        what, detail, attempt + 1, DOWNLOAD_ATTEMPTS, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _resolve_hub(parsed: ParsedURI, cache: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - transformers always brings it
        raise StorageError("hub ids need huggingface_hub (pip install huggingface_hub)") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    kwargs: dict[str, Any] = dict(repo_id=parsed.location, revision=parsed.revision, cache_dir=str(cache / "hub"),
                                  allow_patterns=HUB_ALLOW_PATTERNS)
    try:
        # Try the local cache first: it never touches the network.
        path = Path(snapshot_download(local_files_only=True, **kwargs))
        if _has_weights(path):
            return path
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
    what = f"hf://{parsed.location}"
    path = Path(with_retries(what, lambda: snapshot_download(**kwargs), _hub_error_kind))
    if not _has_weights(path):  # an older repository: pickled weights only
        kwargs["allow_patterns"] = HUB_CONFIG_PATTERNS + HUB_PICKLE_WEIGHT_PATTERNS
        path = Path(with_retries(what, lambda: snapshot_download(**kwargs), _hub_error_kind))
    return path


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


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
