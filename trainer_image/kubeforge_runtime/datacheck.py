"""Data red lines: measure a training file's quality, judge it against thresholds.

Issue 18's "red lines as a gate". A FineTuneJob's ``spec.dataset.checks`` names the lines
(every one optional; unset = not checked):

==========================  ============================================================
``maxUnparseableShare``     bad lines (invalid JSON or not a record of the format) / lines
``maxDuplicateShare``       records beyond the first of their kind / records, "kind" by
                            :func:`data.normalized_key` (exact and near duplicates: whitespace
                            collapsed, only the trained-on keys)
``maxLabelImbalance``       most frequent label / least frequent label; the label is the
                            completion (prompt-completion) or the last assistant message (chat),
                            whitespace collapsed; a ``"label"`` key wins when a record has one
``minRecords``              valid records (fails below, passes at or above)
``maxOverlongShare``        records whose tokenised length (as the trainer tokenises them, EOS
                            included) exceeds ``sequenceLength`` / records; needs a tokenizer
``maxPiiShare``             records with personal data (:func:`pii.contains_pii`, every kind,
                            in the strings trained on) / records; measured on the file as
                            written, before ``dataset.redact``, and only when the line is set
==========================  ============================================================

A ``max*`` line passes at its threshold and fails above it; ``minRecords`` fails below it.

Two pure functions do the work, with no I/O beyond reading the file and no torch:
:func:`measure` (records -> :class:`Measurements`) and :func:`judge` (measurements,
thresholds -> violations). They are used by

* the pod's preflight (``launch.py``), on the real data before torchrun starts: a violation
  exits 78 (``contract.EXIT_CONFIG_ERROR``) with a :data:`REPORT_KIND` JSON report in the
  termination log, which the operator turns into ``reason: DataQualityFailed`` and
  ``status.result.dataQuality``; passing measurements go to the trainer through
  ``contract.ENV_DATA_QUALITY`` and end up in the lineage record and ``status.result``;
* the control plane's CLI, ``kubeforge data check FILE`` (``kubeforge/cli.py``), which imports
  this module only inside the command. This module and ``data.py`` import nothing heavy at
  module level, so every check but ``maxOverlongShare`` works with the base install;
  ``--tokenizer`` needs the ``runtime`` extra (transformers).
"""

from __future__ import annotations

import collections
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import contract, data

log = logging.getLogger(__name__)

REPORT_KIND = contract.DATA_QUALITY_REPORT_KIND
"""``kind`` of the JSON the preflight writes to the termination log when a red line is crossed."""
MAX_REPORT_CHARS = 4000
"""The kubelet keeps 4 KiB of a termination message."""

THRESHOLDS = ("maxUnparseableShare", "maxDuplicateShare", "maxLabelImbalance", "minRecords", "maxOverlongShare",
              "maxPiiShare")
"""The red lines, by their spec names (``spec.dataset.checks``)."""

_MEASURED = {  # threshold -> the measurement it is judged on
    "maxUnparseableShare": "unparseableShare",
    "maxDuplicateShare": "duplicateShare",
    "maxLabelImbalance": "labelImbalance",
    "minRecords": "records",
    "maxOverlongShare": "overlongShare",
    "maxPiiShare": "piiShare",
}


@dataclass
class Measurements:
    """What :func:`measure` found. Shares are fractions in [0, 1], rounded to 6 places."""

    records: int
    """Valid records."""
    unparseableRecords: int
    """Lines that are not valid JSON or not a record of the format (blank lines are not counted)."""
    unparseableShare: float
    """unparseableRecords / (records + unparseableRecords)."""
    duplicateRecords: int
    """Records beyond the first of their normalised content (exact and near duplicates)."""
    exactDuplicateRecords: int
    """The part of duplicateRecords whose content is byte-for-byte the same JSON."""
    duplicateShare: float
    """duplicateRecords / records."""
    labelClasses: int | None = None
    """Distinct labels (prompt-completion and chat only)."""
    labelImbalance: float | None = None
    """Count of the most frequent label / count of the least frequent one."""
    overlongRecords: int | None = None
    """Records longer than sequenceLength tokens (only with a tokenizer)."""
    overlongShare: float | None = None
    """overlongRecords / records."""
    sequenceLength: int | None = None
    """The length overlong records were measured against."""
    piiRecords: int | None = None
    """Records with personal data in a string trained on (only when ``maxPiiShare`` is set)."""
    piiShare: float | None = None
    """piiRecords / records."""

    def to_dict(self) -> dict[str, Any]:
        """The measurements that were taken (None ones left out), JSON-able."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Violation:
    """One red line crossed."""

    check: str
    """The threshold's spec name, e.g. ``maxDuplicateShare``."""
    measured: float | int | None
    threshold: float | int

    def __str__(self) -> str:
        what = _MEASURED[self.check]
        if self.measured is None:
            return f"{self.check}: {what} could not be measured (threshold {_fmt(self.threshold)})"
        op = "below" if self.check == "minRecords" else "above"
        return f"{self.check}: {what} {_fmt(self.measured)} is {op} the threshold {_fmt(self.threshold)}"


def _fmt(value: float | int | None) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _share(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


def label_of(obj: Mapping[str, Any], fmt: str) -> str | None:
    """A record's class label: its ``"label"`` key, else the completion (prompt-completion) or
    the last assistant message (chat), whitespace collapsed; None for text records."""
    if "label" in obj and isinstance(obj["label"], (str, int, bool)):
        return " ".join(str(obj["label"]).split())
    if fmt == "prompt-completion":
        return " ".join(obj["completion"].split())
    if fmt == "chat":
        answers = [m["content"] for m in obj["messages"] if m["role"] == "assistant"]
        return " ".join(answers[-1].split()) if answers else None
    return None


def has_pii(obj: Mapping[str, Any]) -> bool:
    """Whether any string a record trains on (see :func:`data.redact_record`) holds personal data."""
    from . import pii

    return any(pii.contains_pii(text) for text in data.trained_strings(obj))


def measure(records: Iterable[data.Record], fmt: str, *, unparseable: int = 0, tokenizer: Any = None,
            sequence_length: int | None = None, pii: bool = False) -> Measurements:
    """The measurements of parsed ``records`` of format ``fmt``; ``unparseable`` is the count of
    lines that did not parse. Overlong records are counted only with a ``tokenizer`` and a
    ``sequence_length`` (tokenised exactly as the trainer does, :func:`data.tokenize_record`);
    records with personal data only with ``pii``."""
    recs = list(records)
    n = len(recs)
    near: collections.Counter[str] = collections.Counter()
    exact: collections.Counter[str] = collections.Counter()
    for r in recs:
        near[data.normalized_key(r.data)] += 1
        exact[json.dumps(r.data, sort_keys=True, ensure_ascii=False)] += 1
    duplicates = sum(c - 1 for c in near.values())
    m = Measurements(
        records=n, unparseableRecords=unparseable, unparseableShare=_share(unparseable, n + unparseable),
        duplicateRecords=duplicates, exactDuplicateRecords=min(duplicates, sum(c - 1 for c in exact.values())),
        duplicateShare=_share(duplicates, n),
    )
    if fmt in ("prompt-completion", "chat"):
        labels = collections.Counter(x for x in (label_of(r.data, fmt) for r in recs) if x is not None)
        if labels:
            m.labelClasses = len(labels)
            m.labelImbalance = round(max(labels.values()) / min(labels.values()), 6)
    if tokenizer is not None and sequence_length is not None:
        over = sum(1 for r in recs if len(data.tokenize_record(tokenizer, r.data, fmt)[0]) > sequence_length)
        m.overlongRecords, m.overlongShare, m.sequenceLength = over, _share(over, n), sequence_length
    if pii:
        found = sum(1 for r in recs if has_pii(r.data))
        m.piiRecords, m.piiShare = found, _share(found, n)
    return m


def judge(m: Measurements, thresholds: Mapping[str, float | int | None]) -> list[Violation]:
    """The red lines ``m`` crosses. ``thresholds`` maps spec names (:data:`THRESHOLDS`) to
    values; a missing or None one is not checked. A set line whose measurement could not be
    taken (no labels, no tokenizer) is a violation: a gate that cannot look must not pass."""
    unknown = set(thresholds) - set(THRESHOLDS)
    if unknown:
        raise ValueError(f"unknown data checks {sorted(unknown)}; known: {list(THRESHOLDS)}")
    out = []
    for name in THRESHOLDS:
        limit = thresholds.get(name)
        if limit is None:
            continue
        value = getattr(m, _MEASURED[name])
        if value is None:
            out.append(Violation(name, None, limit))
        elif (value < limit) if name == "minRecords" else (value > limit and not math.isclose(value, limit)):
            out.append(Violation(name, value, limit))
    return out


@dataclass
class Report:
    """The result of checking one file: measurements, the thresholds applied, the violations."""

    file: str
    format: str
    measurements: Measurements
    thresholds: dict[str, float | int]
    violations: list[Violation]
    errors: list[str]
    """The first bad lines as file:line: reason (at most ``data.MAX_REPORTED``)."""

    @property
    def passed(self) -> bool:
        return not self.violations

    def message(self) -> str:
        """One paragraph naming every crossed line with its measured value and threshold."""
        if self.passed:
            return f"{self.file}: data checks passed ({_summary(self.measurements)})"
        lines = "; ".join(str(v) for v in self.violations)
        return (f"data quality red line(s) crossed in {self.file}: {lines}. Fix the data or change "
                "spec.dataset.checks")

    def result(self) -> dict[str, Any]:
        """The compact JSON form (``status.result.dataQuality``, lineage ``dataset.quality``)."""
        return {"passed": self.passed, "measurements": self.measurements.to_dict(), "thresholds": self.thresholds,
                "violations": [str(v) for v in self.violations]}

    def termination_report(self) -> str:
        """The compact :data:`REPORT_KIND` JSON for the termination log (under 4 KiB: the
        message is shortened first, the structured part is small and bounded)."""
        body = {"kind": REPORT_KIND, **self.result()}
        room = MAX_REPORT_CHARS - len(json.dumps({**body, "message": ""}, separators=(",", ":")))
        body["message"] = self.message()[: max(0, room - 16)]
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


class DataQualityError(data.DataError):
    """A data red line is crossed; carries the :class:`Report`."""

    def __init__(self, report: Report) -> None:
        super().__init__(report.message())
        self.report = report


def _summary(m: Measurements) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in m.to_dict().items())


def check_file(path: str | Path, fmt: str | None, thresholds: Mapping[str, float | int | None], *,
               tokenizer: Any = None, sequence_length: int | None = None) -> Report:
    """Parse ``path`` (format ``fmt``, detected when None), measure it and judge it.

    Raises :class:`data.DataError` only when the file cannot be read at all."""
    parsed, fmt = data.parse_jsonl(path, fmt)
    applied = {k: v for k, v in thresholds.items() if v is not None}
    m = measure(parsed.records, fmt, unparseable=len(parsed.errors), tokenizer=tokenizer,
                sequence_length=sequence_length, pii="maxPiiShare" in applied)
    return Report(str(path), fmt, m, applied, judge(m, applied), parsed.errors[: data.MAX_REPORTED])
