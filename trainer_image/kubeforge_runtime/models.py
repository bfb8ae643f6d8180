"""Load models and tokenizers through the ordinary Hugging Face code path.

Every entry point loads through here so that a user's model, a fine-tuned output, a LoRA
adapter and a quantized output all take the same road:

* a full model directory (``config.json`` + safetensors) -> ``AutoModelForCausalLM``;
* a quantized output (``config.json`` carries a torchao ``quantization_config``) -> the
  same call: transformers re-applies the torchao layout while loading, once
  :func:`load_requirements` has imported what its lineage record lists (the rules of loading
  a QuantizeJob output live here, below both ``quantize/`` and ``serve/``: the quantizer
  writes the ``REJECTED`` marker and ``loadRequires``, the server honours them through
  :func:`check_servable`);
* a LoRA adapter directory (``adapter_config.json``) -> the base model named in it (or in
  our ``kubeforge.json`` lineage record), then ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

from . import storage

log = logging.getLogger(__name__)

LINEAGE_FILE = "kubeforge.json"
REJECTED_MARKER = "REJECTED"
"""Written by the quantizer into an output that failed its quality gate: kept for inspection,
never served."""


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to change."""


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").exists() and not (path / "config.json").exists()


def read_lineage(path: Path) -> dict[str, Any]:
    f = Path(path) / LINEAGE_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def load_requirements(model_dir: str | Path) -> None:
    """Import the modules a quantized output needs before ``from_pretrained`` can load it.

    Reads ``quantization.loadRequires`` from the output's ``kubeforge.json``; only torchao
    modules are honoured, so a lineage file cannot make a loader import arbitrary code.
    """
    record = read_lineage(Path(model_dir))
    for module in (record.get("quantization") or {}).get("loadRequires", []):
        if isinstance(module, str) and module.startswith("torchao."):
            importlib.import_module(module)
        else:
            log.warning("ignoring loadRequires entry %r: only torchao modules are imported", module)


def _prepare_quantized_embeddings(model_dir: Path) -> None:
    """Register the int8 operators (embedding lookup, ``equal``, weight-only ``linear``) when
    ``model_dir`` is a torchao-quantized output.

    With ``include_input_output_embeddings`` its embedding table is int8; torchao alone would
    dequantize the whole table for every lookup, cannot compare tied quantized weights while
    loading, and builds a full-precision copy of every int8 weight-only linear for each call
    (``quantize/embeddings.py`` and ``quantize/int8_linear.py`` say more).
    """
    config = Path(model_dir) / "config.json"
    if not config.exists():
        return
    try:
        quant = json.loads(config.read_text()).get("quantization_config") or {}
    except (ValueError, AttributeError):
        return
    if quant.get("quant_method") == "torchao":
        from .quantize import embeddings

        embeddings.register_ops()


def check_servable(model_dir: str | Path) -> None:
    """Refuse a QuantizeJob output that failed its quality gate; import what it needs to load.

    The quantizer keeps a rejected output (marked by :data:`REJECTED_MARKER`) for inspection,
    never for serving. int4 outputs need a torchao module imported before loading; the
    quantizer lists it in its lineage record and :func:`load_requirements` imports it.
    """
    marker = Path(model_dir) / REJECTED_MARKER
    if marker.exists():
        raise ModelLoadError(
            f"{model_dir} is a quantized output that failed its quality gate ({marker.read_text().strip()}); "
            "serve the original model or re-run the QuantizeJob with another method"
        )
    load_requirements(model_dir)


def resolve_model_dir(uri: str) -> Path:
    path = storage.resolve(uri)
    if path.is_file():
        raise ModelLoadError(f"{uri!r} is a file; a model is a directory saved with save_pretrained")
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise ModelLoadError(
            f"{uri!r} ({path}) holds neither config.json nor adapter_config.json; "
            "point model.uri at a directory written by save_pretrained"
        )
    return path


def adapter_base_uri(adapter_dir: Path) -> str:
    """The base model an adapter was trained on: our lineage record first, then peft's."""
    lineage = read_lineage(adapter_dir)
    base = lineage.get("baseModel", {}).get("uri") if isinstance(lineage.get("baseModel"), dict) else None
    if not base:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{adapter_dir}: adapter names no base model; set base_model_name_or_path")
    return str(base)


def load_tokenizer(uri_or_path: str | Path):
    from transformers import AutoTokenizer

    path = resolve_model_dir(str(uri_or_path))
    if is_adapter_dir(path) and not (path / "tokenizer_config.json").exists():
        path = resolve_model_dir(adapter_base_uri(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(uri_or_path: str | Path, *, dtype: Any = None, device: Any = None, merge_adapter: bool = False):
    """Load a causal LM (full, quantized or base+adapter) ready for ``eval()`` or training."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(str(uri_or_path))
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        if is_adapter_dir(path):
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(adapter_base_uri(path))), **kwargs)
            model = PeftModel.from_pretrained(base, str(path))
            if merge_adapter:
                model = model.merge_and_unload()
        else:
            _prepare_quantized_embeddings(path)
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {uri_or_path!r}: {exc}") from exc
    if device is not None:
        model = model.to(device)
    return model
