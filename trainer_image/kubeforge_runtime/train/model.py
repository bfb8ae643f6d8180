"""Build the model to train: the base causal LM from its directory, plus LoRA adapters
(on an NF4-quantized base for ``method: qlora``, ``qlora.py``).

Called by the trainer (every rank, on the ``meta`` device through :func:`build_meta`, see
``loading.py``), by the checkpoint loader that
rebuilds a single-process model from a distributed checkpoint (final output, tests) and by
``launch.py`` (config checks only). Loading goes through ``AutoModelForCausalLM`` so a
user's Hugging Face model takes the same road as the tiny test model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import models
from .config import ADAPTER_METHODS, TrainConfig

log = logging.getLogger(__name__)


def model_dir(cfg: TrainConfig) -> Path:
    """The local directory of the base model (downloads hub/s3 URIs into the cache)."""
    return models.resolve_model_dir(cfg.model.uri)


def load_base(path: Path) -> nn.Module:
    """The base model in fp32 (master weights), with SDPA attention (causal without a mask)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tqdm bars from every rank drown the structured log
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise models.ModelLoadError(f"could not load the base model from {path}: {exc}") from exc


def apply_lora(lm: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Wrap ``lm`` with peft LoRA adapters; the adapters' random init is seeded, so every rank
    (and a single-process reference) starts from the same weights."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lo = cfg.lora
    peft_cfg = PeftLoraConfig(
        r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.targetModules),
        bias="none", task_type="CAUSAL_LM",
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.training.seed)
    try:
        model = get_peft_model(lm, peft_cfg)
    except ValueError as exc:
        from .config import ConfigError

        raise ConfigError(f"lora.targetModules {lo.targetModules}: {exc}") from exc
    finally:
        torch.random.set_rng_state(state)
    return model


def build(cfg: TrainConfig, path: Path | None = None) -> tuple[nn.Module, nn.Module]:
    """(top, lm): the object whose ``state_dict`` names are the checkpoint's keys (the peft
    model for LoRA and QLoRA, else the causal LM) and the underlying ``*ForCausalLM``."""
    return prepare(load_base(path or model_dir(cfg)), cfg)


def build_meta(cfg: TrainConfig, path: Path | None = None) -> tuple[nn.Module, nn.Module]:
    """Like :func:`build`, on the ``meta`` device: the trainer lays it out, then
    ``loading.materialize`` reads each rank's part (``loading.py``). Not for QLoRA, whose
    NF4 quantization needs the real weights."""
    from . import loading

    return loading.build_meta(path or model_dir(cfg), cfg)


def prepare(lm: nn.Module, cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """(top, lm) from a loaded (or meta) causal LM: checkpointing, no KV cache, LoRA (and the
    NF4 base for QLoRA, which needs a loaded model)."""
    if cfg.training.gradientCheckpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    if cfg.method in ADAPTER_METHODS:
        top = apply_lora(lm, cfg)
        if cfg.method == "qlora":
            from . import qlora

            if not next(lm.parameters()).is_meta:  # on meta: loading.materialize_qlora quantizes as it reads
                qlora.quantize_base(lm)  # after peft: only frozen weights are quantized
        return top, top.get_base_model()
    return lm, lm


def trainable_names(top: nn.Module) -> list[str]:
    return [n for n, p in top.named_parameters() if p.requires_grad]


def num_parameters(top: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in top.parameters())
    trainable = sum(p.numel() for p in top.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
