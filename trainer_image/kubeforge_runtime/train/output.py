"""The trained model on disk: save_pretrained (safetensors), tokenizer and lineage record.

Called by the trainer on global rank 0 after the final checkpoint. The weights are written
either shard by shard by every rank (``shard_output.py``: no process holds the whole model)
or, where that is not supported (a task evaluation, an ``s3://`` output, ZeRO), by rebuilding
the model in one process from that checkpoint (so the output is independent of the parallel
layout it was trained with), to ``output.uri`` as

* ``merged``: a full model directory (LoRA, if any, merged into the base weights; for QLoRA
  into the dequantized NF4 base, in the base's dtype, so it computes what was trained), or
* ``adapter``: the peft adapter only (``adapter_config.json`` + ``adapter_model.safetensors``),

plus the tokenizer and ``kubeforge.json`` (``models.LINEAGE_FILE``), the lineage record the
quantizer and the server read: base model, revision and file digest, dataset digests (of the
files, and of the records after redaction, with the personal data redacted per kind), config
digest, code version, steps, losses, task metric, data red lines, parallel layout, package
versions, the base's own lineage record (``input``) when it has one, and ``digest``
(``lineage.seal``); plus ``README.md``, a Hugging Face model card made from that record.
``models.load_causal_lm`` loads either kind.

An ``s3://`` output is written to a local staging directory (``storage.output_path``) and
then uploaded, the lineage record last: a reader that finds ``kubeforge.json`` finds a complete
model. A failed upload is a runtime error (``storage.DownloadFailed``: the pod is retried).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from torch import nn

from .. import lineage, models, storage
from .config import ADAPTER_METHODS, TrainConfig

log = logging.getLogger(__name__)

QLORA_LINEAGE = {"format": "nf4", "library": "torchao", "blockSize": 64, "scope": "decoder-layer linear weights, embedding and lm_head"}
"""How a QLoRA run held its frozen base (``qlora.py``), for the lineage record."""

PACKAGES = ("torch", "torchao", "transformers", "peft", "tokenizers", "safetensors", "accelerate", "kubeforge")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def base_revision(cfg: TrainConfig, base_dir: Path) -> str | None:
    """The base model's revision: the hub revision in the URI, the commit of a hub snapshot
    directory, or the revision recorded in the base's own lineage record."""
    parsed = storage.parse_uri(cfg.model.uri)
    if parsed.revision:
        return parsed.revision
    if "snapshots" in base_dir.parts:
        return base_dir.name
    record = models.read_lineage(base_dir)
    rev = record.get("baseModel", {}).get("revision") if isinstance(record.get("baseModel"), dict) else None
    return rev


def lineage_record(cfg: TrainConfig, base_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "FineTuneJob",
        "name": cfg.name,
        "namespace": cfg.namespace,
        "createdAt": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "baseModel": {"uri": cfg.model.uri, "revision": base_revision(cfg, base_dir),
                      **lineage.model_files_digest(base_dir)},
        "dataset": {
            "uri": cfg.dataset.uri,
            "validationUri": cfg.dataset.validationUri,
            "format": cfg.dataset.format,
            "digest": summary.get("datasetDigest"),
            "redactedDigest": summary.get("datasetRedactedDigest"),
            "trainRecords": summary.get("trainRecords"),
            "validationRecords": summary.get("validationRecords"),
            "sequenceLength": cfg.dataset.sequenceLength,
            "packing": cfg.dataset.packing,
            "redact": list(cfg.dataset.redact),
            "redactions": summary.get("redactions", {}),
            "quality": summary.get("dataQuality"),
        },
        "method": cfg.method,
        "lora": cfg.to_dict()["lora"] if cfg.method in ADAPTER_METHODS else None,
        "baseQuantization": QLORA_LINEAGE if cfg.method == "qlora" else None,
        "distillation": cfg.to_dict()["distillation"],
        "format": cfg.output.format,
        "steps": summary.get("steps"),
        "finalLoss": summary.get("finalLoss"),
        "initialValidationLoss": summary.get("initialValidationLoss"),
        "finalValidationLoss": summary.get("finalValidationLoss"),
        "evaluation": ({**cfg.to_dict()["evaluation"], **summary["evaluation"],
                        **({"dataDigest": summary["evaluationDataDigest"]} if summary.get("evaluationDataDigest") else {})}
                       if summary.get("evaluation") else None),
        "heldOutRecordsRemoved": summary.get("heldOutRecordsRemoved"),
        "parallel": summary.get("parallel"),
        "training": cfg.to_dict()["training"],
        "packages": package_versions(),
        "configDigest": lineage.json_digest(cfg.to_dict()),
        "code": lineage.code_version(),
    }


def output_model(top: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The model as it will be written: LoRA merged into the base for ``merged`` output (a
    QLoRA base dequantized first), the peft model for ``adapter`` output, the model itself
    for full fine-tuning."""
    if cfg.method in ADAPTER_METHODS and cfg.output.format == "merged":
        if cfg.method == "qlora":
            from . import qlora

            qlora.dequantize_base(top)
        top = top.merge_and_unload()
    if cfg.output.format == "merged":
        top.config.use_cache = True  # the trainer turned it off; inference (and evaluation) want it
    return top


def save_output(model: nn.Module | None, tokenizer: Any, cfg: TrainConfig, base_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``output_model(...)`` (merged or adapter), tokenizer, lineage and model card to
    ``output.uri`` (for ``s3://``: to the staging directory, then uploaded with the lineage
    record last); the lineage digest goes into ``summary["lineageDigest"]`` (the result).
    ``model`` None: the weights are already there (written shard by shard, ``shard_output.py``)."""
    out = storage.output_path(cfg.output.uri)
    out.mkdir(parents=True, exist_ok=True)
    if model is not None:
        model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    record = lineage_record(cfg, base_dir, summary)
    record["output"] = {"uri": cfg.output.uri, **lineage.model_files_digest(out)}
    record = lineage.seal(record, input_dir=base_dir)
    summary["lineageDigest"] = lineage.write(out, record)
    lineage.write_model_card(out, record, license=lineage.base_license(base_dir))
    log.info("model written to %s (%s)", out, cfg.output.format)
    if storage.is_s3(cfg.output.uri):
        # Checkpoints live beside the output only when checkpoint.uri is unset; they have
        # their own staging directory and upload (checkpoint.py), never part of this one.
        storage.upload_dir(out, cfg.output.uri, last=(models.LINEAGE_FILE,), skip=("checkpoints",), replace=True)
    return out
