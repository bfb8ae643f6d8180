"""The input model's task figure from its own lineage record, when that record measured it.

A FineTuneJob with ``spec.evaluation`` measures its output's held-out task metric (greedy
generation, ``evaluate.py``) on the model exactly as it writes it, and records the figure in
the output's lineage (``kubeforge.json``: ``evaluation.after``, the metric, ``maxSamples`` and
the evaluation file's digest). A QuantizeJob of that output that asks for the same metric on
the same records would measure the same model on the same data again (about a minute for
100 classification records on two cores, far more for generation tasks), so it takes the
recorded figure instead - only when every one of these holds:

* the input directory has a lineage record of a FineTuneJob, and its digests verify;
* the record's output digest is the input directory's digest now (the very files measured);
* the same metric and ``maxSamples``, and the evaluation file's bytes digest as recorded;
* the same runtime code (``lineage.code_version``: the evaluator that produced the figure).

Anything else (an older record without the data digest, another file, a changed model) and
the figure is measured as before; the log says why. The report says where the figure came
from (``task.beforeSource``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from .. import lineage as lineage_mod

log = logging.getLogger(__name__)

MEASURED = "measured"
"""``task.beforeSource`` when the quantizer measured the input model itself."""


def recorded_task_metric(input_dir: Path, input_digest: str, task_path: Path, metric: str,
                         max_samples: int) -> tuple[dict[str, Any] | None, str]:
    """``(result, source)``: the input model's recorded task result (``metric``, ``value``,
    ``samples``) and where it came from, or ``(None, why not)``."""
    record = lineage_mod.read(input_dir)
    if record is None or record.get("kind") != "FineTuneJob":
        return None, "the input has no FineTuneJob lineage record"
    problems = lineage_mod.verify(record)
    if problems:
        return None, f"its lineage record does not verify ({problems[0]})"
    if (record.get("output") or {}).get("digest") != input_digest:
        return None, "its files are not the ones its lineage record describes"
    ev = record.get("evaluation") or {}
    if not ev.get("dataDigest"):
        return None, "its lineage record has no evaluation data digest (written by an older trainer)"
    if ev.get("metric") != metric or ev.get("maxSamples") != max_samples:
        return None, (f"its lineage measured {ev.get('metric')} on up to {ev.get('maxSamples')} records, "
                      f"this job asks for {metric} on up to {max_samples}")
    if ev["dataDigest"] != lineage_mod.file_digest(task_path):
        return None, "its lineage measured another evaluation file"
    if record.get("code") != lineage_mod.code_version():
        return None, "its lineage was written by another version of the runtime"
    value, samples = ev.get("after"), ev.get("samples")
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not isinstance(samples, int):
        return None, "its lineage record holds no finite figure"
    source = f"lineage of FineTuneJob {record.get('namespace')}/{record.get('name')} ({record['digest']})"
    return {"metric": metric, "value": float(value), "samples": samples}, source


def task_metric_before(input_dir: Path, input_digest: str, task_path: Path, metric: str, max_samples: int,
                       measure: Any) -> tuple[dict[str, Any], str]:
    """The input model's task result and its source: recorded when it may be reused (see
    the module docstring), else ``measure()`` and :data:`MEASURED`."""
    recorded, source = recorded_task_metric(input_dir, input_digest, task_path, metric, max_samples)
    if recorded is not None:
        log.info("original model: %s %.1f%% on %d records, taken from the %s (the same files, records and "
                 "evaluator; not measured again)", metric, recorded["value"] * 100, recorded["samples"], source)
        return recorded, source
    log.info("original model's task metric measured here: %s", source)
    return measure(), MEASURED


__all__ = ["MEASURED", "recorded_task_metric", "task_metric_before"]
