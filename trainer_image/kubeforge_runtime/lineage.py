"""Lineage records: digests of what an output was made from, sealed and chained.

Every output directory (a fine-tuned model, a quantized model) carries ``kubeforge.json``
(``models.LINEAGE_FILE``). This module computes the pieces that make it an audit record and
seals it; the trainer (``train/output.py``), the quantizer (``quantize/runner.py``), the server
(which reports the served model's digest) and ``kubeforge audit`` (which reads the JSON only)
use it. Pure: hashlib, json and the file system; no torch.

* :func:`model_files_digest` - sha256 over a model directory's files (weights, config,
  tokenizer), sorted by relative path, streamed; the audit files themselves are left out.
* :func:`records_digest` - sha256 over canonical JSON of data records (the trainer's digest of
  the data *after* redaction, as it was trained on).
* :func:`json_digest` - sha256 of canonical JSON (the config digest).
* :func:`file_digest` - sha256 of one file (the held-out task evaluation set a figure came from).
* :func:`code_version` - package version and, where known, the git commit.
* :func:`seal` - embed the input's own lineage record (``input``), so the chain
  FineTuneJob -> QuantizeJob nests into one document, and add ``digest``: sha256 of the
  record's canonical JSON without ``digest`` and ``createdAt`` (so the same inputs and results
  give the same digest; a changed dataset byte, model file or config value changes it).
* :func:`verify` - recompute the digests of a record and of every record nested in it.
* :func:`model_card` - the ``README.md`` written next to the output (Hugging Face model card).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

LINEAGE_FILE = "kubeforge.json"
MODEL_CARD_FILE = "README.md"
AUDIT_FILES = frozenset({LINEAGE_FILE, MODEL_CARD_FILE, "quantization-report.json", "REJECTED"})
"""Files of an output directory that describe the model rather than make it: not in its digest."""
UNSEALED_KEYS = ("digest", "createdAt")
"""Keys outside the sealed content: the digest itself and the wall-clock time."""
ENV_GIT_COMMIT = "KUBEFORGE_GIT_COMMIT"
"""The commit the runtime image was built from (set by the image build; else git is asked)."""
_CHUNK = 1 << 20


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """``"sha256:..."`` of one file's bytes (e.g. the held-out evaluation set a figure was measured on)."""
    return "sha256:" + _sha256_file(Path(path))


def _model_files(model_dir: Path) -> Iterator[Path]:
    for p in sorted(model_dir.rglob("*"), key=lambda q: q.relative_to(model_dir).as_posix()):
        rel = p.relative_to(model_dir)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if len(rel.parts) == 1 and p.name in AUDIT_FILES:
            continue
        yield p


def model_files_digest(model_dir: str | Path) -> dict[str, Any]:
    """``{"digest": "sha256:...", "files": {relpath: "sha256:..."}}`` of a model directory.

    The directory digest covers each file's relative path and content digest, in sorted
    order, so renaming, adding, removing or changing any file changes it."""
    model_dir = Path(model_dir)
    files = {p.relative_to(model_dir).as_posix(): "sha256:" + _sha256_file(p) for p in _model_files(model_dir)}
    h = hashlib.sha256()
    for rel, digest in files.items():
        h.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    return {"digest": "sha256:" + h.hexdigest(), "files": files}


def finite(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN; canonical JSON must be valid)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def canonical(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, UTF-8, non-finite floats as null."""
    return json.dumps(finite(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=str).encode()


def json_digest(value: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical(value)).hexdigest()


def records_digest(records: Iterable[Any]) -> str:
    """sha256 over the canonical JSON of each record, one per line, in order."""
    h = hashlib.sha256()
    for r in records:
        h.update(canonical(r) + b"\n")
    return "sha256:" + h.hexdigest()


def _git_commit() -> str | None:
    commit = os.environ.get(ENV_GIT_COMMIT)
    if commit:
        return commit
    for dist in ("kubeforge",):
        try:
            direct = importlib.metadata.distribution(dist).read_text("direct_url.json")
        except importlib.metadata.PackageNotFoundError:
            direct = None
        if direct:
            vcs = json.loads(direct).get("vcs_info") or {}
            if vcs.get("commit_id"):
                return str(vcs["commit_id"])
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """``{"package": "kubeforge", "version": ..., "commit": ... or None}``."""
    from . import __version__

    try:
        version = importlib.metadata.version("kubeforge")
    except importlib.metadata.PackageNotFoundError:
        version = __version__
    return {"package": "kubeforge", "version": version, "commit": _git_commit()}


def read(model_dir: str | Path) -> dict[str, Any] | None:
    """The lineage record of ``model_dir``, or None when it has none (or it is unreadable)."""
    f = Path(model_dir) / LINEAGE_FILE
    try:
        record = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_digest(record: dict[str, Any]) -> str:
    return json_digest({k: v for k, v in record.items() if k not in UNSEALED_KEYS})


def seal(record: dict[str, Any], input_dir: str | Path | None = None) -> dict[str, Any]:
    """``record`` with ``input`` (the input model's own lineage record, when it has one) and
    ``digest``; non-finite numbers become null."""
    out = finite(dict(record))
    if input_dir is not None and "input" not in out:
        parent = read(input_dir)
        if parent is not None:
            out["input"] = parent
    out.pop("digest", None)
    out["digest"] = record_digest(out)
    return out


def write(out_dir: str | Path, record: dict[str, Any]) -> str:
    """Write a sealed record to ``out_dir/kubeforge.json``; return its digest."""
    (Path(out_dir) / LINEAGE_FILE).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    return str(record["digest"])


def chain(record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The records from the oldest (the first FineTuneJob) to ``record``."""
    out: list[dict[str, Any]] = []
    while isinstance(record, dict):
        out.append(record)
        record = record.get("input")
    return out[::-1]


def verify(record: dict[str, Any]) -> list[str]:
    """Problems with the digests of ``record`` and the records nested in it (empty: all match).

    ``record`` itself must be sealed. A nested record without a ``digest`` (a base model's
    description, e.g. the embedded model's) is covered by the digest of the record that nests it."""
    problems = []
    for r in chain(record):
        if r is not record and "digest" not in r:
            continue
        if r.get("digest") != record_digest(r):
            problems.append(f"{r.get('kind')}/{r.get('name')}: digest {r.get('digest')} does not match its content")
    return problems


# --- model card -----------------------------------------------------------------------------

def _yaml_scalar(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def _front_matter(fields: dict[str, Any]) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if value is None or value == []:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {_yaml_scalar(v)}" for v in value)
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    lines.append("---")
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _root_base(record: dict[str, Any]) -> str | None:
    first = chain(record)[0]
    base = first.get("baseModel") or {}
    uri = base.get("uri") if isinstance(base, dict) else None
    return uri


def _hub_id(uri: str | None) -> str | None:
    if uri and uri.startswith("hf://"):
        return uri[len("hf://"):].split("@", 1)[0]
    return None


def model_card(record: dict[str, Any], license: str | None = None) -> str:
    """A Hugging Face model card (YAML front matter + Markdown) from a sealed lineage record."""
    records = chain(record)
    finetunes = [r for r in records if r.get("kind") == "FineTuneJob"]
    quantizes = [r for r in records if r.get("kind") == "QuantizeJob"]
    base_uri = _root_base(record)
    datasets = [str(r["dataset"]["uri"]) for r in finetunes if isinstance(r.get("dataset"), dict) and r["dataset"].get("uri")]
    tags = ["kubeforge", "text-generation"]
    if finetunes:
        tags.append("fine-tuned")
        tags.extend(sorted({str(r.get("method")) for r in finetunes if r.get("method")}))
    if quantizes:
        tags.append("quantized")
        tags.extend(sorted({str((r.get("quantization") or {}).get("method")) for r in quantizes
                            if (r.get("quantization") or {}).get("method")}))
    front = _front_matter({
        "license": license,
        "base_model": _hub_id(base_uri),  # the Hub expects a repo id; other URIs are in the body
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
        "datasets": datasets,
    })
    name = f"{record.get('kind')}/{record.get('name')}"
    out = [front, "", f"# {record.get('name')}", "",
           f"Made by KubeForge ({name}, namespace {record.get('namespace')}).", "",
           f"- lineage digest: `{record.get('digest')}`",
           f"- code: kubeforge {(record.get('code') or {}).get('version')} "
           f"(commit {(record.get('code') or {}).get('commit') or 'unknown'})",
           f"- base model: `{base_uri}`", ""]
    for r in finetunes:
        ds = r.get("dataset") or {}
        out += [f"## Fine-tuning ({r.get('name')})", "",
                "### Data", "",
                f"- dataset: `{ds.get('uri')}` ({ds.get('format')}, {ds.get('trainRecords')} training / "
                f"{ds.get('validationRecords')} validation records)",
                f"- file digest: `{ds.get('digest')}`; after redaction: `{ds.get('redactedDigest')}`",
                f"- personal data redacted: {', '.join(f'{k}={v}' for k, v in (ds.get('redactions') or {}).items()) or 'none asked'}",
                f"- data red lines: {_quality(ds.get('quality'))}", "",
                "### Method", "",
                f"- {r.get('method')} ({r.get('format')} output), {r.get('steps')} steps",
                f"- base model files: `{(r.get('baseModel') or {}).get('digest')}`",
                f"- config digest: `{r.get('configDigest')}`", "",
                "### Metrics", "",
                "| metric | before | after |", "|---|---|---|",
                f"| validation loss | {_fmt(r.get('initialValidationLoss'))} | {_fmt(r.get('finalValidationLoss'))} |",
                f"| training loss (last step) | | {_fmt(r.get('finalLoss'))} |"]
        ev = r.get("evaluation")
        if ev:
            out.append(f"| {ev.get('metric')} (task, {ev.get('samples')} samples) | {_fmt(ev.get('before'))} | "
                       f"{_fmt(ev.get('after'))} |")
        out.append("")
    for r in quantizes:
        q = r.get("quantization") or {}
        ppl = r.get("perplexity") or {}
        out += [f"## Quantization ({r.get('name')})", "",
                f"- method: {q.get('method')}" + (f", group size {q.get('groupSize')}" if q.get("groupSize") else "")
                + f", from {q.get('originalDtype')} on {q.get('device')}",
                f"- input model files: `{(r.get('baseModel') or {}).get('digest')}`",
                f"- quality gate: {'passed' if r.get('gatePassed') else 'FAILED (output rejected)'}", "",
                "| metric | before | after |", "|---|---|---|",
                f"| perplexity | {_fmt(ppl.get('before'))} | {_fmt(ppl.get('after'))} |"]
        ev = r.get("evaluation")
        if ev:
            out.append(f"| {ev.get('metric')} (task, {ev.get('samples')} samples) | {_fmt(ev.get('before'))} | "
                       f"{_fmt(ev.get('after'))} |")
        size = r.get("size") or {}
        if size:
            out.append(f"| weight bytes | {size.get('before')} | {size.get('after')} |")
        out.append("")
    out += ["## Limits", "",
            "- Trained and measured only on the data named above; the metrics say nothing about other tasks, "
            "languages or domains.",
            "- The base model's own limits, biases and license apply unchanged.",
            "- Redaction replaces the kinds of personal data listed, as far as patterns find them; it is not a "
            "guarantee that no personal data remains.",
            "- Check the digests with `kubeforge audit --dir <this directory>` before relying on this card.", ""]
    return "\n".join(out)


def _quality(q: Any) -> str:
    if not isinstance(q, dict):
        return "not checked"
    return "passed" if q.get("passed", not q.get("violations")) else f"violations: {q.get('violations')}"


def write_model_card(out_dir: str | Path, record: dict[str, Any], license: str | None = None) -> Path:
    path = Path(out_dir) / MODEL_CARD_FILE
    path.write_text(model_card(record, license))
    return path


def base_license(model_dir: str | Path | None) -> str | None:
    """The ``license`` of a base model: its own model card's front matter, else its lineage record's."""
    if model_dir is None:
        return None
    record = read(model_dir) or {}
    if isinstance(record.get("license"), str):
        return str(record["license"]).lower()
    try:
        text = (Path(model_dir) / MODEL_CARD_FILE).read_text(errors="replace")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    for line in text.split("\n---", 1)[0].splitlines()[1:]:
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip().strip("'\"") or None
    return None
