"""Training data: JSONL records -> fixed-length token tensors, sharded per data-parallel rank.

Used by the trainer (``kubeforge_runtime.train``), by the pod's preflight (``launch.py``,
which parses the data before torchrun starts) and from the command line as a dataset check::

    python -m kubeforge_runtime.data check FILE [--format F] [--tokenizer DIR] [--json]

Record formats (one JSON object per line; extra keys are ignored):

* ``text``: ``{"text": "..."}`` - the loss is taken on every token.
* ``prompt-completion``: ``{"prompt": "...", "completion": "..."}`` - the loss is taken on
  the completion (and its EOS) only.
* ``chat``: ``{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}]}`` -
  rendered with the tokenizer's chat template; the loss is taken on assistant turns only.

Every sample is exactly ``sequence_length`` tokens (pipeline parallelism needs static
shapes): with packing, tokenized records (each ending in EOS) are concatenated and cut into
chunks; without it, each record is truncated or right-padded (padding is never a target, and
attention is causal, so right padding cannot change any target's loss). That is also why a
training or validation step may drop a micro-batch's columns after its last target
(:func:`target_span`): short records then cost their own length, not ``sequence_length``.

Packed records do not see each other: every sample comes with position ids that restart at
0 where a record starts, the model's RoPE uses them, and transformers' mask builder turns
restarts into a block-diagonal causal mask (``create_causal_mask`` with ``position_ids``).
A record's first token is never a target (nothing of it precedes it), exactly as without
packing. A record cut by a chunk boundary continues in the next chunk as its own segment.
Unpacked samples have plain ``0..S-1`` positions, which keep attention's causal fast path.

Labels are stored already shifted: ``labels[i]`` is the target for position ``i`` (the
next token), -100 where there is none. Every parallel layout computes the loss the same
way from them.

Held-out data stays held out: records are compared by :func:`normalized_key` (their content
with whitespace collapsed), ``validationSplit`` puts every copy of a record on the same side,
and training records that also appear in the validation file or in an excluded file (a task
evaluation set, ``prepare(exclude_paths=...)``) are dropped with a warning, so a validation
or task score never measures recall of a training record.

Personal data: with ``dataset.redact`` (``prepare(redact=...)``), records are passed through
:func:`kubeforge_runtime.pii.redact` as they are read, before anything else: emails, phone
numbers, IP addresses, card and id numbers become ``<EMAIL>``, ``<PHONE>``, ... in every
string the model sees (text; prompt and completion; every message's content). So records
that differ only in personal data are duplicates for the split and the overlap checks, and
held-out files are compared redacted too (a training record equal to a task-evaluation
record but for a name's phone number is still dropped). Only the in-memory copies change,
never the files; the counts per kind over the records trained and validated on are in
:attr:`TokenizedData.redactions` (logged, and written to the lineage record by the trainer).

Order and sharding: :class:`GlobalBatchSampler` maps a global step to the sample indices of
that step's global batch (a seeded permutation per epoch), and each data-parallel rank takes
its contiguous slice of it. The order is a function of the step alone, so training resumes
exactly where it stopped, also with a different data-parallel degree.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import lineage

log = logging.getLogger(__name__)

FORMATS = ("text", "prompt-completion", "chat")
IGNORE_INDEX = -100
MAX_REPORTED = 20
"""How many bad records an error message lists (the count is always complete)."""


class DataError(ValueError):
    """The data cannot be used; the message lists the bad records as file:line: reason."""


@dataclass
class Record:
    """One parsed JSONL line and where it came from."""

    data: dict[str, Any]
    file: str
    line: int
    redactions: dict[str, int] = field(default_factory=dict)
    """Spans of personal data replaced in ``data`` per kind (``dataset.redact``)."""


@dataclass
class ParseResult:
    records: list[Record] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Bad records as "file:line: reason"."""


# --- reading and validating -------------------------------------------------------------------

def _record_error(obj: Any, fmt: str) -> str | None:
    """Why ``obj`` is not a valid ``fmt`` record, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if fmt == "text":
        if not isinstance(obj.get("text"), str):
            return 'text format needs a string "text" field'
        if not obj["text"].strip():
            return '"text" is empty'
    elif fmt == "prompt-completion":
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                return f'prompt-completion format needs a string "{key}" field'
        if not obj["completion"].strip():
            return '"completion" is empty (nothing to learn from)'
    elif fmt == "chat":
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return 'chat format needs a non-empty "messages" list'
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f'messages[{i}] needs string "role" and "content"'
            if m["role"] not in ("system", "user", "assistant", "tool"):
                return f"messages[{i}].role {m['role']!r} is not system, user, assistant or tool"
        if not any(m["role"] == "assistant" for m in msgs):
            return "no assistant message (nothing to learn from)"
    else:
        return f"unknown format {fmt!r}; use one of {FORMATS}"
    return None


def detect_format(obj: Any) -> str | None:
    """Guess a record's format from its keys."""
    if isinstance(obj, dict):
        if "messages" in obj:
            return "chat"
        if "prompt" in obj and "completion" in obj:
            return "prompt-completion"
        if "text" in obj:
            return "text"
    return None


def parse_jsonl(path: str | Path, fmt: str | None) -> tuple[ParseResult, str]:
    """Read ``path``; return valid records, bad ones (file:line: reason) and the format used
    (``fmt``, or detected from the first object when None)."""
    p = Path(path)
    result = ParseResult()
    try:
        fh = p.open("r", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue  # blank lines are allowed (trailing newline, separators)
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                result.errors.append(f"{p}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if fmt is None:
                fmt = detect_format(obj)
                if fmt is None:
                    result.errors.append(f"{p}:{lineno}: cannot tell the format (no text/prompt+completion/messages keys)")
                    continue
            reason = _record_error(obj, fmt)
            if reason:
                result.errors.append(f"{p}:{lineno}: {reason}")
            else:
                result.records.append(Record(obj, str(p), lineno))
    return result, fmt or "text"


def load_records(path: str | Path, fmt: str, *, skip_bad: bool = False) -> list[Record]:
    """All records of ``path``; :class:`DataError` listing file:line of every bad one.

    With ``skip_bad`` (``dataset.checks.maxUnparseableShare`` set: the preflight has already
    bounded their share) bad lines are logged and skipped instead."""
    result, _ = parse_jsonl(path, fmt)
    if result.errors and skip_bad:
        log.warning("skipping %d bad record(s) in %s (dataset.checks.maxUnparseableShare): %s", len(result.errors),
                    path, "; ".join(result.errors[:3]))
    elif result.errors:
        shown = "\n  ".join(result.errors[:MAX_REPORTED])
        more = f"\n  ... and {len(result.errors) - MAX_REPORTED} more" if len(result.errors) > MAX_REPORTED else ""
        raise DataError(f"{len(result.errors)} bad record(s) in {path} (format {fmt}):\n  {shown}{more}")
    if not result.records:
        raise DataError(f"{path}: no records")
    return result.records


def file_digest(*paths: str | Path | None) -> str:
    """sha256 over the given files' bytes (the dataset digest in the lineage record)."""
    h = hashlib.sha256()
    for p in paths:
        if p is None:
            continue
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


# --- tokenizing -------------------------------------------------------------------------------

def _ensure_eos(ids: list[int], eos: int | None) -> list[int]:
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def tokenize_record(tokenizer: Any, record: dict[str, Any], fmt: str) -> tuple[list[int], list[int]]:
    """Token ids and (unshifted) labels of one record; labels are -100 where no loss is taken."""
    eos = tokenizer.eos_token_id
    if fmt == "text":
        ids = _ensure_eos(tokenizer(record["text"])["input_ids"], eos)
        return ids, list(ids)
    if fmt == "prompt-completion":
        p_ids = tokenizer(record["prompt"])["input_ids"]
        c_ids = _ensure_eos(tokenizer(record["completion"], add_special_tokens=False)["input_ids"], eos)
        return p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids
    if fmt == "chat":
        return _tokenize_chat(tokenizer, record["messages"])
    raise DataError(f"unknown format {fmt!r}")


def _tokenize_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("dataset.format chat needs a tokenizer with a chat template (tokenizer_config.json chat_template)")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    # Character spans of the assistant turns: render the conversation up to each assistant
    # message with the generation prompt, then including it; the difference is the turn.
    # This relies on the template rendering prefixes consistently, which holds for the usual
    # templates; when it does not, fall back to training on the whole conversation.
    spans: list[tuple[int, int]] = []
    consistent = True
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            consistent = False
            break
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not consistent:
        log.warning("chat template does not render prefixes consistently; training on all tokens")
        return ids, list(ids)
    labels = []
    for tok_id, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = any(s <= start < e or (start == end and s < end <= e) for s, e in spans)
        labels.append(tok_id if inside else IGNORE_INDEX)
    return ids, labels


def target_span(labels: Any) -> int:
    """How many leading columns of a batch of shifted ``labels`` (shape (rows, S)) reach its
    last target: one past the last column where any row has a label other than
    :data:`IGNORE_INDEX` (at least 1). The columns after it are right padding or prompt tails
    without targets; attention is causal, so no target's logit depends on them and a step may
    drop them (the trainer does, see ``Trainer._trim``) without changing a loss or gradient."""
    has_target = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    return max(1, int(has_target[-1]) + 1) if len(has_target) else 1


def build_samples(
    pairs: Iterable[tuple[list[int], list[int]]],
    sequence_length: int,
    packing: bool,
    pad_id: int,
):
    """Fixed-length ``(input_ids, labels, position_ids)`` LongTensors of shape (N,
    sequence_length), labels shifted (``labels[:, i]`` is the target of position i) and
    position ids restarting at every record start (see the module docstring)."""
    import torch

    s = sequence_length
    inputs: list[list[int]] = []
    targets: list[list[int]] = []
    positions: list[list[int]] = []
    if packing:
        stream_ids: list[int] = []
        stream_labels: list[int] = []
        stream_pos: list[int] = []
        for ids, labels in pairs:
            stream_ids.extend(ids)
            # The first token of a record cannot be predicted from inside the record.
            stream_labels.extend([IGNORE_INDEX] + labels[1:] if labels else labels)
            stream_pos.extend(range(len(ids)))
        # Chunk k covers positions [kS, (k+1)S); its targets are the labels one further on,
        # so every token but the very last is a target at most once.
        for k in range((len(stream_ids) - 1) // s):
            inputs.append(stream_ids[k * s:(k + 1) * s])
            targets.append(stream_labels[k * s + 1:(k + 1) * s + 1])
            positions.append(stream_pos[k * s:(k + 1) * s])
    else:
        for ids, labels in pairs:
            ids, labels = ids[: s + 1], labels[: s + 1]
            inp = ids[:s]
            tgt = labels[1 : len(inp) + 1]
            tgt = tgt + [IGNORE_INDEX] * (len(inp) - len(tgt))
            inputs.append(inp + [pad_id] * (s - len(inp)))
            targets.append(tgt + [IGNORE_INDEX] * (s - len(tgt)))
            positions.append(list(range(s)))
    if not inputs:
        empty = torch.empty(0, s, dtype=torch.long)
        return empty, empty.clone(), empty.clone()
    return (torch.tensor(inputs, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long))


@dataclass
class TokenizedData:
    """Training and validation samples, ready for the sampler."""

    train_inputs: Any
    train_labels: Any
    train_positions: Any
    val_inputs: Any
    val_labels: Any
    val_positions: Any
    digest: str
    num_train_records: int
    num_val_records: int
    dropped_overlap: int = 0
    """Training records dropped because they also appear in the validation or excluded data."""
    redactions: dict[str, int] = field(default_factory=dict)
    """Spans of personal data replaced per kind (training and validation records together);
    empty when nothing was asked to be redacted."""
    redacted_digest: str = ""
    """sha256 over the training then validation records as trained on: after redaction and the
    removal of held-out duplicates (``lineage.records_digest``); ``digest`` is over the files."""


# --- duplicates and held-out data -----------------------------------------------------------------

CONTENT_KEYS = {"chat": ("messages",), "prompt-completion": ("prompt", "completion"), "text": ("text",)}
"""The keys a record of each format trains on; others ("id", "label", "tests") are not content."""


def _collapse(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, list):
        return [_collapse(v) for v in value]
    if isinstance(value, dict):
        return {k: _collapse(v) for k, v in value.items()}
    return value


def normalized_key(record_data: dict[str, Any]) -> str:
    """The identity of a record for duplicate and overlap checks: its JSON (sorted keys) with
    every string's whitespace collapsed and stripped, so "a  b" and "a b " are the same record.

    Only the content a record trains on counts (``messages``; ``prompt`` and ``completion``;
    or ``text``, by the keys the record has): two records that differ in an extra key such as
    ``"id"`` or ``"tests"`` train the model identically. A record of no known format is
    compared whole."""
    fmt = detect_format(record_data)
    content = {k: record_data[k] for k in CONTENT_KEYS[fmt] if k in record_data} if fmt else record_data
    return json.dumps(_collapse(content), sort_keys=True, ensure_ascii=False)


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``fraction`` of the records (seeded, independent of world size).

    Duplicates (equal :func:`normalized_key`) always land on the same side, so no validation
    record is also a training record: the split draws distinct records, and every copy of a
    drawn one goes with it. Without duplicates this is a plain seeded draw of records."""
    import torch

    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(normalized_key(r.data), []).append(i)
    members = list(groups.values())  # in order of first appearance
    if fraction <= 0 or len(members) < 2:
        if fraction > 0 and len(records) >= 2:
            log.warning("validationSplit: every record is the same; nothing can be held out")
        return records, []
    n_val = min(len(members) - 1, max(1, round(len(members) * fraction)))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(members), generator=g).tolist()
    val_idx = {i for k in perm[:n_val] for i in members[k]}
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def remove_overlap(train: list[Record], heldout: list[Record]) -> tuple[list[Record], int]:
    """``train`` without the records whose :func:`normalized_key` is one of ``heldout``'s, and
    how many were dropped."""
    keys = {normalized_key(r.data) for r in heldout}
    kept = [r for r in train if normalized_key(r.data) not in keys]
    return kept, len(train) - len(kept)


# --- personal data ------------------------------------------------------------------------------

TRAINED_KEYS = ("text", "prompt", "completion")
"""A record's top-level string keys that are trained on (besides each message's ``content``)."""


def trained_strings(record_data: dict[str, Any]) -> list[str]:
    """The strings a record trains on: ``text``; ``prompt`` and ``completion``; each message's ``content``."""
    out = [record_data[k] for k in TRAINED_KEYS if isinstance(record_data.get(k), str)]
    for m in record_data.get("messages") or ():
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            out.append(m["content"])
    return out


def redact_record(record_data: dict[str, Any], kinds: Iterable[str]) -> tuple[dict[str, Any], collections.Counter[str]]:
    """A copy of a record with personal data of ``kinds`` replaced by placeholders in the strings
    it trains on (``text``; ``prompt`` and ``completion``; each message's ``content``), and the
    replacements per kind. Other keys are copied unchanged; ``record_data`` is not modified."""
    from . import pii

    kinds = list(kinds)
    counts: collections.Counter[str] = collections.Counter()
    out = dict(record_data)

    def clean(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text, n = pii.redact(value, kinds)
        counts.update(n)
        return text

    for key in TRAINED_KEYS:
        if key in out:
            out[key] = clean(out[key])
    if isinstance(out.get("messages"), list):
        out["messages"] = [{**m, "content": clean(m.get("content"))} if isinstance(m, dict) else m
                           for m in out["messages"]]
    return out, counts


def redact_records(records: list[Record], kinds: Iterable[str]) -> tuple[list[Record], collections.Counter[str]]:
    """:func:`redact_record` over ``records`` (new Record objects; file and line kept) and the total counts."""
    kinds = list(kinds)
    total: collections.Counter[str] = collections.Counter()
    out = []
    for r in records:
        data, n = redact_record(r.data, kinds)
        total.update(n)
        out.append(Record(data, r.file, r.line, dict(n)))
    return out, total


def format_redactions(counts: dict[str, int], kinds: Iterable[str]) -> str:
    """``email=3 phone=0 ...`` in the order asked (kinds with no hit shown as 0)."""
    return " ".join(f"{k}={counts.get(k, 0)}" for k in kinds)


def prepare(
    tokenizer: Any,
    train_path: str | Path,
    fmt: str,
    sequence_length: int,
    packing: bool,
    validation_path: str | Path | None = None,
    validation_split: float = 0.0,
    seed: int = 0,
    exclude_paths: Iterable[str | Path] = (),
    redact: Iterable[str] = (),
    skip_bad: bool = False,
) -> TokenizedData:
    """Parse, split, tokenize and pack the data (deterministic: every rank gets the same).

    ``exclude_paths`` are held-out files of the same format (a task evaluation set, say):
    training records that also appear there are dropped, as are training records that appear
    in the validation file; the split of ``validation_split`` keeps duplicates on one side.
    ``redact`` lists kinds of personal data (``pii.ALL_KINDS``) replaced by placeholders in every
    record as it is read, before the split and the held-out checks (the files are not changed).
    ``skip_bad`` skips bad lines of the training file (only) instead of failing."""
    redact = list(redact)

    def load(path: str | Path, skip: bool = False) -> list[Record]:
        records = load_records(path, fmt, skip_bad=skip)
        return redact_records(records, redact)[0] if redact else records

    exclude_paths = list(exclude_paths)
    records = load(train_path, skip_bad)
    dropped = 0
    for path in exclude_paths:
        records, n = remove_overlap(records, load(path))
        if n:
            log.warning("dropped %d training record(s) that also appear in the held-out file %s", n, path)
        dropped += n
    if validation_path is not None:
        val = load(validation_path)
        train, n = remove_overlap(records, val)
        if n:
            log.warning("dropped %d training record(s) that also appear in the validation file %s", n,
                        validation_path)
        dropped += n
    else:
        train, val = split_records(records, validation_split, seed)
    if not train:
        raise DataError(f"{train_path}: no training records left after removing the held-out ones")
    redactions: collections.Counter[str] = collections.Counter()
    if redact:
        for r in (*train, *val):
            redactions.update(r.redactions)
        log.info("dataset.redact: replaced %s in %d training and %d validation records", format_redactions(
            redactions, redact), len(train), len(val))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tr_in, tr_lab, tr_pos = build_samples((tokenize_record(tokenizer, r.data, fmt) for r in train), sequence_length,
                                          packing, pad)
    va_in, va_lab, va_pos = build_samples((tokenize_record(tokenizer, r.data, fmt) for r in val), sequence_length,
                                          packing, pad)
    if len(tr_in) == 0:
        raise DataError(f"{train_path}: too little text for one sample of {sequence_length} tokens")
    return TokenizedData(tr_in, tr_lab, tr_pos, va_in, va_lab, va_pos,
                         file_digest(train_path, validation_path, *exclude_paths), len(train), len(val), dropped,
                         {k: redactions.get(k, 0) for k in redact},
                         lineage.records_digest(r.data for r in (*train, *val)))


# --- order and sharding -------------------------------------------------------------------------

class GlobalBatchSampler:
    """Deterministic global batches: step -> sample indices, and each rank's slice of them.

    Epoch ``e`` is a permutation of the samples seeded with ``seed + e``; step ``s`` of the
    run is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` (a last partial
    batch is dropped so that every step has exactly ``global_batch_size`` samples). Because
    the order depends on the step only, resuming needs nothing but the step number.
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int) -> None:
        if num_samples < global_batch_size:
            raise DataError(
                f"only {num_samples} training samples but training.globalBatchSize is {global_batch_size}; "
                "add data, lower globalBatchSize or shorten dataset.sequenceLength"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.step = 0
        self._perm_epoch = -1
        self._perm: list[int] = []

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def _permutation(self, epoch: int) -> list[int]:
        import torch

        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_samples, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> list[int]:
        """Sample indices of the global batch of (0-based) ``step``."""
        perm = self._permutation(self.epoch_of(step))
        pos = step % self.steps_per_epoch
        return perm[pos * self.global_batch_size:(pos + 1) * self.global_batch_size]

    def rank_batch(self, step: int, dp_rank: int, dp_size: int) -> list[int]:
        """This data-parallel rank's contiguous share of the step's global batch."""
        batch = self.global_batch(step)
        per = len(batch) // dp_size
        return batch[dp_rank * per:(dp_rank + 1) * per]

    def __iter__(self):
        while True:
            yield self.global_batch(self.step)
            self.step += 1

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            log.warning("dataset changed since the checkpoint (%s samples, now %s); the order differs",
                        state.get("num_samples"), self.num_samples)
        self.step = int(state["step"])


# --- dataset check ------------------------------------------------------------------------------

def _label_of(obj: dict[str, Any], fmt: str) -> str | None:
    if "label" in obj and isinstance(obj["label"], (str, int, bool)):
        return str(obj["label"])
    if fmt == "prompt-completion":
        return obj["completion"].strip()
    if fmt == "chat":
        answers = [m["content"] for m in obj["messages"] if m["role"] == "assistant"]
        return answers[-1].strip() if answers else None
    return None


def check(path: str | Path, fmt: str | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Summarise a dataset: samples, bad records, tokens (or characters), duplicates and, for
    classification-style data (short answers from a small set, or a "label" key), label balance."""
    result, fmt = parse_jsonl(path, fmt)
    recs = result.records
    summary: dict[str, Any] = {"file": str(path), "format": fmt, "records": len(recs),
                               "badRecords": len(result.errors), "errors": result.errors[:MAX_REPORTED]}
    seen: collections.Counter[str] = collections.Counter()
    for r in recs:
        seen[normalized_key(r.data)] += 1  # the identity the validation split and overlap checks use
    summary["duplicates"] = sum(c - 1 for c in seen.values())
    if tokenizer is not None:
        lengths, trained = [], 0
        for r in recs:
            ids, labels = tokenize_record(tokenizer, r.data, fmt)
            lengths.append(len(ids))
            trained += sum(1 for x in labels if x != IGNORE_INDEX)
        summary["tokens"] = _stats(lengths)
        summary["trainedTokens"] = trained
    else:
        summary["characters"] = _stats([len(json.dumps(r.data)) for r in recs])
    labels = [_label_of(r.data, fmt) for r in recs]
    counts = collections.Counter(x for x in labels if x is not None)
    has_label_key = any("label" in r.data for r in recs)
    short = all(len(x.split()) <= 3 for x in counts) if counts else False
    if counts and (has_label_key or (short and len(counts) <= max(20, len(recs) // 20) and len(counts) < len(recs))):
        most, least = max(counts.values()), min(counts.values())
        summary["labels"] = {
            "classes": len(counts),
            "counts": dict(counts.most_common()),
            "imbalanceRatio": round(most / least, 3),
        }
    return summary


def _stats(values: list[int]) -> dict[str, float | int]:
    if not values:
        return {"total": 0, "min": 0, "max": 0, "mean": 0.0}
    return {"total": sum(values), "min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 2)}


def _format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['file']}: {s['records']} records ({s['format']}), {s['badRecords']} bad, {s['duplicates']} duplicates"]
    if "tokens" in s:
        t = s["tokens"]
        lines.append(f"tokens: {t['total']} total, {t['min']}-{t['max']} per record (mean {t['mean']}), "
                     f"{s['trainedTokens']} with loss")
    else:
        c = s["characters"]
        lines.append(f"characters: {c['total']} total, mean {c['mean']} per record (pass --tokenizer for tokens)")
    if "labels" in s:
        lab = s["labels"]
        lines.append(f"labels: {lab['classes']} classes, imbalance {lab['imbalanceRatio']}x: "
                     + ", ".join(f"{k!r}={v}" for k, v in list(lab["counts"].items())[:10]))
    lines.extend(s["errors"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeforge_runtime.data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="summarise a JSONL dataset and report bad records")
    c.add_argument("file")
    c.add_argument("--format", choices=FORMATS, default=None, help="record format (default: detected)")
    c.add_argument("--tokenizer", default=None, help="model/tokenizer directory, to count tokens")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tok = None
    if args.tokenizer:
        from .models import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    try:
        summary = check(args.file, args.format, tok)
    except DataError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    sys.stdout.write((json.dumps(summary, indent=2) if args.json else _format_summary(summary)) + "\n")
    return 1 if summary["badRecords"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
