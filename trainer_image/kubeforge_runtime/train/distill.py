"""Knowledge distillation (``method: distill``): the loss, the teacher, and where it runs.

Called by the trainer (``trainer.py``) when the config has ``distillation``; the preflight
(``launch.py``) calls :func:`check_same_tokenizer`. The student is the job's ``model``
(all weights trained); the teacher is ``distillation.teacher.uri``, loaded once per rank that
needs it, in ``eval()`` mode with ``requires_grad`` off, and run under ``torch.no_grad``.

The loss, per target token (the tokens the ordinary loss is taken on: labels that are not
``IGNORE_INDEX``), summed over the global batch and normalised exactly like the ordinary
loss (dp / target tokens of the global batch), so every layout computes what one process
computes::

    loss = alpha * CE(student, label) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

``alpha = 1`` is the ordinary loss; the T^2 factor keeps the soft term's gradient scale
independent of T (Hinton et al., 2015). The reported training loss is this mix; validation
loss stays the student's plain cross-entropy, so it compares with other runs.

How the teacher's logits reach the loss, whatever the layout: the loss function
(:class:`DistillLoss`) receives a target with one extra column, the row of each sample in
this rank's local batch, and computes the teacher's logits for exactly those rows itself.
So the same code serves the plain loop (one call per micro-batch) and the pipeline schedule
(which splits the target into micro-batches and calls the loss on the last stage only).

Where the teacher lives (:func:`place_teacher`):

* data parallel: every data-parallel rank runs the teacher on its own samples. With
  ``fsdp`` the teacher is sharded over the data-parallel ranks too (``fully_shard`` per
  decoder layer and root, gathered layer by layer in its forward), so it needs 1/dp of its
  size per rank; with ``ddp`` and ``deepspeed-zero1|2|3`` it is replicated whole on every
  rank (DeepSpeed's engine takes one model; a ZeRO-3-partitioned teacher is not built).
* tensor parallel: the teacher is tensor-parallelised with the same plan over the same
  ``tp`` group (logits whole on every tp rank, as the student's).
* pipeline parallel: the teacher is not pipelined. It runs whole (sharded over that stage's
  dp and tp ranks as above) on the last stage's ranks, which are the ones that compute the
  loss; the other stages hold no teacher. Input ids are on every rank (each rank tokenises
  the whole data set), so the last stage needs no extra communication. The limit: the last
  stage holds the whole teacher (divided by dp x tp with fsdp), plus its own layers.

Verified (tests/unit/runtime/train/test_train_distill.py): DP=2 with FSDP2 and ZeRO-3 (the
student partitioned, the teacher whole), TP=2, and PP=2 with 1F1B equal one process; DDP,
ZeRO-2 and GPipe, which place the teacher as ZeRO-3 and 1F1B do, were tested the same way when
this was built and are left out of the suite for its time.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import data as data_mod
from .config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


def distillation_loss_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                           temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed, ce, kl): sums over the target tokens of ``labels`` (not IGNORE_INDEX).

    ``ce`` is the ordinary cross-entropy sum, ``kl`` the sum of KL(teacher || student) of the
    temperature-softened distributions times T^2, and ``mixed = alpha * ce + (1 - alpha) * kl``.
    Logits are [batch, seq, vocab] and labels [batch, seq] (already shifted, as the trainer's).
    """
    s = student_logits.float().flatten(0, 1)
    flat = labels.flatten()
    ce = F.cross_entropy(s, flat, ignore_index=data_mod.IGNORE_INDEX, reduction="sum")
    mask = flat != data_mod.IGNORE_INDEX
    s_t = F.log_softmax(s[mask] / temperature, dim=-1)
    t_t = F.log_softmax(teacher_logits.float().flatten(0, 1)[mask] / temperature, dim=-1)
    kl = F.kl_div(s_t, t_t, log_target=True, reduction="sum") * temperature ** 2
    return alpha * ce + (1 - alpha) * kl, ce, kl


def with_rows(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` with one more column: each sample's row in this local batch (see the module docstring)."""
    rows = torch.arange(labels.shape[0], dtype=labels.dtype, device=labels.device).unsqueeze(1)
    return torch.cat([labels, rows], dim=1)


class DistillLoss:
    """The trainer's loss function when distilling (the pipeline's ``loss_fn`` too).

    ``scale`` and ``sums`` as the trainer's ``TokenLoss``. Before each step the trainer sets
    ``inputs``/``positions`` to the local batch. A target of the logits' length is a plain
    label target (validation: cross-entropy only); one column longer carries the rows.
    """

    def __init__(self, teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, temperature: float,
                 alpha: float, autocast: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        self.teacher = teacher
        self.temperature = temperature
        self.alpha = alpha
        self.autocast = autocast
        self.scale = 1.0
        self.sums: list[torch.Tensor] = []
        self.inputs: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape[1] == logits.shape[1]:
            ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=data_mod.IGNORE_INDEX,
                                 reduction="sum")
            self.sums.append(ce.detach())
            return ce * self.scale
        labels, rows = target[:, :-1], target[:, -1]
        assert self.teacher is not None and self.inputs is not None and self.positions is not None
        with torch.no_grad(), self.autocast():
            teacher_logits = self.teacher(self.inputs[rows], self.positions[rows])
        mixed, _, _ = distillation_loss_sums(logits, teacher_logits, labels, self.temperature, self.alpha)
        self.sums.append(mixed.detach())
        return mixed * self.scale


# --- the teacher ------------------------------------------------------------------------------

def teacher_dir(cfg: TrainConfig) -> Path:
    """The local directory of the teacher (downloads hub/s3 URIs into the cache, as for the model)."""
    from .. import models

    assert cfg.distillation is not None
    return models.resolve_model_dir(cfg.distillation.teacher.uri)


def load_teacher(path: Path) -> nn.Module:
    """The teacher causal LM in fp32, frozen and in eval mode."""
    from .model import load_base

    lm = load_base(path)
    lm.config.use_cache = False
    lm.eval()
    lm.requires_grad_(False)
    return lm


def place_teacher(lm: nn.Module, *, strategy: str, mesh: Any, tp: int, device: torch.device) -> nn.Module:
    """Shard the teacher like the student (module docstring) and return the module to call
    with (input ids, position ids) -> logits."""
    from .parallelize import CausalLMStage, apply_tensor_parallel, layer_items

    if tp > 1:
        apply_tensor_parallel(lm, mesh["tp"])
    lm.to(device)
    stage = CausalLMStage(lm, True, True)
    dp_mesh = mesh["dp"]
    if strategy == "fsdp" and dp_mesh.size() > 1:
        from torch.distributed.fsdp import fully_shard

        for _, layer in layer_items(lm):
            fully_shard(layer, mesh=dp_mesh, reshard_after_forward=True)
        fully_shard(stage, mesh=dp_mesh, reshard_after_forward=True)
    stage.eval()
    return stage


def teacher_forward(stage: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A call of the placed teacher that leaves no gathered (FSDP) parameters behind."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in stage.modules() if isinstance(m, FSDPModule)]

    def run(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = stage(x, pos)
        for m in fsdp:  # FSDP keeps the root gathered after forward (it expects a backward)
            m.reshard()
        return out

    return run


# --- the preflight check ----------------------------------------------------------------------

def tokenizer_fingerprint(tok: Any) -> dict[str, Any]:
    """What two tokenizers must agree on for their models' distributions to be comparable."""
    return {
        "vocab": tok.get_vocab(),
        "special": {name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")},
        "added": sorted(str(t) for t in tok.all_special_tokens),
    }


def check_same_tokenizer(student_uri: str, student_dir: Path, teacher_uri: str, teacher_dir: Path) -> None:
    """ConfigError naming both models when their tokenizers or vocabulary sizes differ."""
    from transformers import AutoConfig

    from .. import models

    both = f"model.uri {student_uri!r} and distillation.teacher.uri {teacher_uri!r}"
    a, b = (tokenizer_fingerprint(models.load_tokenizer(d)) for d in (student_dir, teacher_dir))
    problems = []
    if a["vocab"] != b["vocab"]:
        va, vb = a["vocab"], b["vocab"]
        differ = sum(1 for k in set(va) | set(vb) if va.get(k) != vb.get(k))
        problems.append(f"vocabularies differ ({len(va)} vs {len(vb)} tokens, {differ} token ids differ)")
    if a["special"] != b["special"] or a["added"] != b["added"]:
        problems.append(f"special tokens differ ({a['special']} vs {b['special']})")
    sa, sb = (AutoConfig.from_pretrained(str(d)).vocab_size for d in (student_dir, teacher_dir))
    if sa != sb:
        problems.append(f"output vocabulary sizes differ (config vocab_size {sa} vs {sb})")
    if problems:
        raise ConfigError(f"{both} do not share a tokenizer: {'; '.join(problems)}. A student learns from its "
                          "teacher's token distributions, so both need the same tokenizer: pick a teacher of the "
                          "student's family (or a student built from the teacher's config)")
