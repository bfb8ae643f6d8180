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
* ``s3://bucket/key`` or ``s3://bucket/prefix`` - copied with boto3 (the optional ``s3`` extra)
  into a cache dir: a URI naming one object resolves to that file (a dataset), else every
  object under ``prefix/`` is copied into one directory (a model). The endpoint comes from
  ``AWS_ENDPOINT_URL`` (S3-compatible stores: MinIO, Ceph, ...), the credentials from boto3's
  usual environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, which the operator
  injects from the Secret named by ``spec.storage.s3.credentialsSecretRef``). An object key
  with a ``..`` segment, a leading ``/`` or a backslash is refused (:class:`StorageError`
  naming the key) before anything is written: no key can place a file outside the target.

Outputs (:func:`output_path`): ``file``/``pvc`` URIs are written in place; an ``s3://`` output is
written to a local staging directory (:func:`staging_path`) and then copied up with
:func:`upload_dir`, the completeness marker (a lineage record, a checkpoint's state file) last.

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


class DownloadFailed(RuntimeError):  # also raised for a failed upload (same handling)
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

    Remote schemes are refused here: an ``s3://`` output goes through :func:`output_path`
    (a staging directory) and :func:`upload_dir`.
    """
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        return Path(parsed.location)
    if parsed.scheme == "pvc":
        return pvc_root() / parsed.location
    raise StorageError(f"{uri!r}: outputs must be file://, pvc:// or s3:// paths (got {parsed.scheme}://)")


def is_s3(uri: str | None) -> bool:
    return bool(uri) and parse_uri(uri).scheme == "s3"  # type: ignore[arg-type]


STAGING_ENV = "KUBEFORGE_STAGING_DIR"


def staging_path(uri: str) -> Path:
    """The local directory an ``s3://`` output or checkpoint directory is written to before it
    is uploaded: ``$KUBEFORGE_STAGING_DIR`` (default ``~/.cache/kubeforge/staging``, i.e. the
    pod's workspace volume) / a digest of the normalised URI, so an output and a checkpoint
    directory inside it never share a staging directory."""
    import hashlib

    from . import contract

    root = Path(os.environ.get(STAGING_ENV) or Path.home() / ".cache" / "kubeforge" / "staging")
    return root / hashlib.sha256(contract.normalize_uri(uri).encode()).hexdigest()[:16]


def output_path(uri: str) -> Path:
    """Where to write an output locally: the path of a file/pvc URI, the staging directory of
    an ``s3://`` one (upload it with :func:`upload_dir` when it is complete)."""
    return staging_path(uri) if is_s3(uri) else local_path(uri)


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


def with_retries(what: str, fetch: Callable[[], T], kind: Callable[[BaseException], str], *, verb: str = "download") -> T:
    """Call ``fetch``; retry it after a transient failure (``kind(exc) == "transient"``) with
    exponential back-off, :data:`DOWNLOAD_ATTEMPTS` tries in all. A "config" failure raises
    :class:`StorageError` at once; anything else, or the last transient one, :class:`DownloadFailed`."""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return fetch()
        except StorageError:
            raise  # already says what to change
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}".strip()
            found = kind(exc)
            if found == "config":
                raise StorageError(f"{what}: {detail}; check the name, the revision and the access token") from None
            if found != "transient" or attempt == DOWNLOAD_ATTEMPTS:
                tries = f" after {attempt} tries" if attempt > 1 else ""
                hint = (" If this cluster has no internet access, copy the model to a volume and use pvc:// or "
                        "file://") if verb == "download" else ""
                raise DownloadFailed(f"{what}: {verb} failed{tries} ({detail}); the pod will be retried.{hint}") from exc
            delay = DOWNLOAD_BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s: transient %s failure (%s); try %d of %d in %.0f s",
                        what, verb, detail, attempt + 1, DOWNLOAD_ATTEMPTS, delay)
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


# --- S3 -------------------------------------------------------------------------------------

S3_CREDENTIAL_HINT = ("set spec.storage.s3.credentialsSecretRef to a Secret with the keys AWS_ACCESS_KEY_ID and "
                      "AWS_SECRET_ACCESS_KEY (and spec.storage.s3.endpoint for an S3-compatible store); locally, "
                      "export AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL")


def _boto3() -> Any:
    try:
        import boto3  # type: ignore[import-not-found]
    except ImportError as exc:
        raise StorageError("s3:// URIs need boto3, the s3 extra: pip install 'kubeforge[s3]'") from exc
    return boto3


def s3_client() -> Any:
    """A boto3 S3 client; ``AWS_ENDPOINT_URL`` overrides the endpoint (S3-compatible stores).
    botocore's own retries are kept small: :func:`with_retries` retries whole transfers."""
    boto3 = _boto3()
    from botocore.config import Config  # type: ignore[import-not-found]

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                        config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=10,
                                      read_timeout=60))


def check_s3_ready(uri: str, what: str) -> None:
    """Raise :class:`StorageError` (exit 78) when an ``s3://`` URI cannot be used from here:
    boto3 missing, or no credentials found; the message says what to set."""
    boto3 = _boto3()
    if boto3.Session().get_credentials() is None:
        raise StorageError(f"{what} {uri!r}: no S3 credentials: {S3_CREDENTIAL_HINT}")


def check_output_uri(uri: str, what: str) -> None:
    """The preflight's check of an output or checkpoint URI: a file/pvc path, or an ``s3://``
    URI with boto3 installed and credentials present; else :class:`StorageError` saying what to set."""
    if is_s3(uri):
        check_s3_ready(uri, what)
    else:
        local_path(uri)


def _s3_error_kind(exc: BaseException) -> str:
    """"config" for a missing bucket/key or refused access, "transient" for connection
    failures, throttling and 5xx, "other" otherwise."""
    try:
        from botocore.exceptions import (  # type: ignore[import-not-found]
            ClientError, ConnectionError as BotoConnectionError, NoCredentialsError, ReadTimeoutError,
        )
    except ImportError:  # pragma: no cover
        return "other"
    if isinstance(exc, StorageError):
        return "config"
    if isinstance(exc, NoCredentialsError):
        return "config"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if err.get("Code") in ("SlowDown", "RequestTimeout", "Throttling", "InternalError", "ServiceUnavailable") \
                or status in (408, 429) or status >= 500:
            return "transient"
        return "config"
    if isinstance(exc, (BotoConnectionError, ReadTimeoutError, ConnectionError, TimeoutError)):
        return "transient"
    return "other"


def _split(location: str) -> tuple[str, str]:
    bucket, _, key = location.partition("/")
    return bucket, key.strip("/")


def safe_relative_key(key: str, prefix: str) -> str:
    """The part of ``key`` below ``prefix``, as a relative path that stays inside a target
    directory. A key with a ``..`` or ``.`` segment, a leading ``/``, an empty segment or a
    backslash is refused (:class:`StorageError` naming it): written naively, ``models/m/../../x``
    would land outside the directory the download was meant to fill."""
    bad = ("\\" in key or key.startswith("/") or any(seg in ("..", ".") for seg in key.split("/"))
           or "\x00" in key)
    rel = key[len(prefix):].lstrip("/") if prefix else key
    if bad or not rel or "//" in rel or rel.startswith("/"):
        raise StorageError(f"S3 object key {key!r}: refused (a '..' or '.' segment, an absolute path, an empty "
                           "segment or a backslash could write outside the target directory); rename or delete "
                           "that object")
    return rel


def _inside(dest: Path, target: Path) -> Path:
    resolved = dest.resolve()
    if not resolved.is_relative_to(target.resolve()):  # defence in depth (symbolic links)
        raise StorageError(f"S3 download: {dest} would lie outside {target}; refused")
    return dest


def list_s3(uri: str) -> list[dict[str, Any]]:
    """Every object under ``uri`` taken as a directory (``prefix/``), with Key and Size."""
    bucket, prefix = _split(parse_uri(uri).location)
    client = s3_client()

    def fetch() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            out.extend(page.get("Contents", []))
        return out

    return with_retries(uri, fetch, _s3_error_kind, verb="listing")


def download_s3_dir(uri: str, target: Path, *, last: tuple[str, ...] = (), skip_existing: bool = False) -> Path:
    """Copy every object under ``uri/`` into ``target`` (files named ``last`` are fetched last;
    with ``skip_existing``, files already there are kept). Every key is checked
    (:func:`safe_relative_key`) before the first byte is written."""
    bucket, prefix = _split(parse_uri(uri).location)
    objects = list_s3(uri)
    if not objects:
        raise StorageError(f"{uri}: no objects under that prefix")
    rels = [(obj["Key"], safe_relative_key(obj["Key"], prefix)) for obj in objects]
    sizes = {obj["Key"]: (int(obj.get("Size", -1)), obj["LastModified"].timestamp() if obj.get("LastModified") else 0.0)
             for obj in objects}
    rels.sort(key=lambda kr: Path(kr[1]).name in last)
    client = s3_client()
    target.mkdir(parents=True, exist_ok=True)
    for key, rel in rels:
        dest = _inside(target / rel, target)
        if skip_existing and dest.exists():
            continue
        _download_object(client, bucket, key, dest, sizes[key])
    return target


def _download_object(client: Any, bucket: str, key: str, dest: Path, meta: tuple[int, float]) -> None:
    """Fetch one object to ``dest`` unless ``dest`` already has its size and modification time
    (the preflight and every rank of a node resolve the same URIs: fetch once). A temporary
    name per process, then an atomic rename: concurrent ranks never see a partial file."""
    size, mtime = meta
    if dest.is_file() and dest.stat().st_size == size and abs(dest.stat().st_mtime - mtime) < 1:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    with_retries(f"s3://{bucket}/{key}", lambda: client.download_file(bucket, key, str(tmp)), _s3_error_kind)
    os.utime(tmp, (mtime, mtime))
    tmp.replace(dest)


def read_s3_object(uri: str) -> bytes | None:
    """The bytes of one object, or None when it does not exist."""
    bucket, key = _split(parse_uri(uri).location)
    client = s3_client()

    def fetch() -> bytes | None:
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    return with_retries(uri, fetch, _s3_error_kind)


def upload_dir(local: Path, uri: str, *, last: tuple[str, ...] = (), skip: tuple[str, ...] = (),
               replace: bool = False) -> None:
    """Copy the files under ``local`` to ``uri/``.

    Files named in ``last`` (completeness markers, in that order) go up after everything else
    and are deleted remotely first, so a reader never sees an old marker next to new, partly
    uploaded files. With ``replace``, remote objects under ``uri/`` that ``local`` does not hold
    (an earlier output's other weight files, a stale rejection marker) are deleted too, before
    the upload. Top-level names in ``skip`` are neither copied nor deleted. Each file is retried
    on a transient failure; a failure raises :class:`DownloadFailed` (a runtime error: the pod is
    retried) and leaves no new marker."""
    bucket, prefix = _split(parse_uri(uri).location)
    client = s3_client()
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and p.relative_to(local).parts[0] not in skip
             and not p.name.endswith((".tmp", ".part"))]
    files.sort(key=lambda p: last.index(p.name) + 1 if p.name in last else 0)

    def key_of(p: Path) -> str:
        return "/".join(filter(None, [prefix, p.relative_to(local).as_posix()]))

    doomed = [key_of(p) for p in files if p.name in last]
    if replace:
        keep = {key_of(p) for p in files}
        for obj in list_s3(uri):
            rel = obj["Key"][len(prefix):].lstrip("/") if prefix else obj["Key"]
            if obj["Key"] not in keep and rel.split("/")[0] not in skip:
                doomed.append(obj["Key"])
    for i in range(0, len(doomed), 1000):  # markers first: the output stops counting as complete
        chunk = doomed[i:i + 1000]
        with_retries(uri, lambda: client.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk]}), _s3_error_kind, verb="upload")
    for p in files:
        key = key_of(p)
        with_retries(f"s3://{bucket}/{key}", lambda: client.upload_file(str(p), bucket, key), _s3_error_kind,
                     verb="upload")
    log.info("uploaded %d files from %s to %s", len(files), local, uri)


def upload_file(local: Path, uri: str) -> None:
    """Copy one file to the object ``uri`` (retried; a failure is :class:`DownloadFailed`)."""
    bucket, key = _split(parse_uri(uri).location)
    client = s3_client()
    with_retries(uri, lambda: client.upload_file(str(local), bucket, key), _s3_error_kind, verb="upload")


def delete_s3_keys(*uris: str) -> None:
    """Delete the objects ``uris`` (of one bucket); absent ones are no error."""
    if not uris:
        return
    bucket, _ = _split(parse_uri(uris[0]).location)
    keys = [_split(parse_uri(u).location)[1] for u in uris]
    client = s3_client()
    with_retries(uris[0], lambda: client.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]}), _s3_error_kind, verb="delete")


def delete_s3_prefix(uri: str) -> None:
    """Delete every object under ``uri/`` (pruned checkpoints)."""
    bucket, _ = _split(parse_uri(uri).location)
    keys = [obj["Key"] for obj in list_s3(uri)]
    client = s3_client()
    for i in range(0, len(keys), 1000):
        chunk = keys[i:i + 1000]
        with_retries(uri, lambda: client.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk]}), _s3_error_kind, verb="delete")


def _resolve_s3(parsed: ParsedURI, cache: Path) -> Path:
    """One object (a dataset file) resolves to that file; a prefix to a directory of its objects."""
    bucket, key = _split(parsed.location)
    uri = f"s3://{parsed.location}"
    check_s3_ready(uri, "input")
    client = s3_client()
    if key:
        def head() -> tuple[int, float] | None:
            """(size, modification time) of the object ``key``, or None (a "directory" prefix)."""
            try:
                meta = client.head_object(Bucket=bucket, Key=key)
            except Exception as exc:
                from botocore.exceptions import ClientError  # type: ignore[import-not-found]

                if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return int(meta["ContentLength"]), meta["LastModified"].timestamp()

        found = with_retries(uri, head, _s3_error_kind)
        if found:
            rel = safe_relative_key(key, "")
            dest = _inside(cache / "s3" / bucket / rel, cache / "s3" / bucket)
            _download_object(client, bucket, key, dest, found)
            return dest
    if key:
        safe_relative_key(key, "")  # the prefix itself may not climb out either
    target = cache / "s3" / bucket / (key or "_bucket")
    return download_s3_dir(uri, target)
