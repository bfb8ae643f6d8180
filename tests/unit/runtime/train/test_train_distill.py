"""Distillation (``method: distill``): the loss by hand, the layouts against one process, the preflight.

The loss is checked on a case small enough to compute with pencil and paper (two-word
vocabulary, T = 1 and T = 2). The layout tests launch the trainer as the pod does (real
torchrun, gloo) with a teacher that is another tiny model (same tokenizer, other weights)
and compare losses, first-step gradients and final parameters with one process on the whole
batch, with the tolerance the ordinary layout tests use (test_train_distributed.py).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from train_support import STEPS, Run, assert_same, merge, rel

from kubeforge_runtime import data as data_mod
from kubeforge_runtime.train.distill import DistillLoss, distillation_loss_sums, with_rows

IGN = data_mod.IGNORE_INDEX
LAUNCH_TIMEOUT = 1200  # each launch also loads a teacher; on a crowded 2-core machine 240 s was not enough


# --- the loss -------------------------------------------------------------------------------------

def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two positions: the first a target (label 0) with a uniform student and a teacher at
    odds 3:1; the second not a target, with wild logits that must not count."""
    student = torch.tensor([[[0.0, 0.0], [9.0, -9.0]]])
    teacher = torch.tensor([[[math.log(3.0), 0.0], [-9.0, 9.0]]])
    labels = torch.tensor([[0, IGN]])
    return student, teacher, labels


def test_alpha_one_is_the_ordinary_loss() -> None:
    student, teacher, labels = _case()
    mixed, ce, _ = distillation_loss_sums(student, teacher, labels, temperature=2.0, alpha=1.0)
    ordinary = torch.nn.functional.cross_entropy(student.flatten(0, 1), labels.flatten(), ignore_index=IGN,
                                                 reduction="sum")
    assert mixed.item() == pytest.approx(ordinary.item(), rel=1e-7)
    assert ce.item() == pytest.approx(math.log(2), rel=1e-6)  # uniform over two words


def test_kl_and_temperature_by_hand() -> None:
    student, teacher, labels = _case()
    # T = 1: teacher (3/4, 1/4) against the uniform student (1/2, 1/2).
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    _, _, kl = distillation_loss_sums(student, teacher, labels, temperature=1.0, alpha=0.0)
    assert kl.item() == pytest.approx(kl1, rel=1e-6)
    # T = 2: the teacher softens to (sqrt3, 1) / (sqrt3 + 1); the term is scaled by T^2 = 4.
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    mixed, ce, kl = distillation_loss_sums(student, teacher, labels, temperature=2.0, alpha=0.25)
    assert kl.item() == pytest.approx(kl2, rel=1e-6)
    assert mixed.item() == pytest.approx(0.25 * math.log(2) + 0.75 * kl2, rel=1e-6)
    assert kl2 != pytest.approx(kl1, rel=1e-2)  # the temperature matters


def test_kl_is_zero_when_the_student_is_the_teacher_and_its_gradient_points_to_it() -> None:
    student, teacher, labels = _case()
    _, _, kl = distillation_loss_sums(teacher, teacher, labels, temperature=3.0, alpha=0.0)
    assert abs(kl.item()) < 1e-6
    s = student.clone().requires_grad_(True)
    distillation_loss_sums(s, teacher, labels, temperature=1.0, alpha=0.0)[0].backward()
    # Descending the gradient raises the student's first logit of the target position (towards 3:1).
    assert s.grad[0, 0, 0] < 0 < s.grad[0, 0, 1]
    assert torch.all(s.grad[0, 1] == 0)  # not a target: no gradient


def test_distill_loss_computes_the_teacher_for_the_rows_it_is_given() -> None:
    """The loss function's own plumbing: rows in the target's last column pick the samples
    the teacher runs on; a plain target (validation) gives the ordinary cross-entropy."""
    torch.manual_seed(0)
    inputs = torch.randint(0, 5, (4, 3))
    positions = torch.arange(3).repeat(4, 1)
    table = torch.randn(5, 5)
    seen: list[torch.Tensor] = []

    def teacher(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return table[x]

    import contextlib

    loss = DistillLoss(teacher, temperature=2.0, alpha=0.5, autocast=contextlib.nullcontext)
    loss.inputs, loss.positions = inputs, positions
    labels = torch.randint(0, 5, (4, 3))
    logits = torch.randn(4, 3, 5)
    target = with_rows(labels)[2:4]  # the second micro-batch of two
    got = loss(logits[2:4], target)
    want = distillation_loss_sums(logits[2:4], table[inputs[2:4]], labels[2:4], 2.0, 0.5)[0]
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.equal(seen[0], inputs[2:4])
    plain = loss(logits, labels)
    assert plain.item() == pytest.approx(distillation_loss_sums(logits, logits, labels, 1.0, 1.0)[0].item(), rel=1e-6)


# --- real launches ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny model: the same tokenizer (built the same way), other random weights."""
    from kubeforge_runtime.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("teacher") / "model", preset="tiny", seed=1)


def _distill(teacher: Path, **extra: Any) -> dict[str, Any]:
    return {"method": "distill", "distillation": {"teacher": {"uri": f"file://{teacher}"}, "temperature": 2.0,
                                                  "alpha": 0.5}, **extra}


@pytest.fixture(scope="session")
def distill_reference(launcher: Callable[..., Run], teacher_model: Path) -> Run:
    """One process, whole global batch, through the preflight (which compares the tokenizers)."""
    return launcher("distill-reference", _distill(teacher_model), via_launch=True, timeout=LAUNCH_TIMEOUT)


DISTILL_LAYOUTS: dict[str, tuple[int, dict[str, Any], dict[str, int]]] = {
    "dp2-fsdp": (2, {"parallelism": {"strategy": "fsdp"}}, {"data": 2}),
    "tp2": (2, {"parallelism": {"tensor": 2}}, {"tensor": 2}),
    "pp2-1f1b": (2, {"parallelism": {"pipeline": 2, "pipelineSchedule": "1F1B"}}, {"pipeline": 2}),
    "dp2-zero3": (2, {"parallelism": {"strategy": "deepspeed-zero3"}}, {"data": 2}),
}
"""One layout per way the teacher is placed (distill.py, ``place_teacher``): sharded with the
student over the data ranks (FSDP2), replicated whole beside a partitioned student (ZeRO-3;
DDP and ZeRO-2 replicate it the same way around an unpartitioned one), tensor-parallelised
with the student's plan (TP), and whole on the last stage only (PP, with 1F1B, the schedule
that interleaves microbatches; GPipe runs the same stage code in a simpler order). DDP, ZeRO-2
and GPipe are tested against one process without a teacher (test_train_distributed.py,
test_train_zero.py). Each launch here costs 1-3 minutes of the suite on 2 cores, which is why
the list is not all seven."""



@pytest.mark.torchrun
@pytest.mark.timeout(LAUNCH_TIMEOUT * 2)
def test_distillation_learns_from_the_teacher(distill_reference: Run, launcher: Callable[..., Run]) -> None:
    """The teacher term is really there: the losses are not the plain run's, and pure
    distillation (alpha 0) lowers the distance to the teacher step by step."""
    got = distill_reference.dump()
    plain = launcher("reference-full").dump()
    assert rel(got["losses"], plain["losses"]) > 1e-3
    assert got["layout"]["data"] == 1 and len(got["losses"]) == STEPS


@pytest.mark.torchrun
@pytest.mark.timeout(LAUNCH_TIMEOUT * 2)
@pytest.mark.parametrize("name", list(DISTILL_LAYOUTS))
def test_distillation_layout_equals_single_process(name: str, launcher: Callable[..., Run], teacher_model: Path,
                                                   distill_reference: Run) -> None:
    nproc, overrides, degrees = DISTILL_LAYOUTS[name]
    got = launcher(f"distill-{name}", {**_distill(teacher_model), **overrides}, nproc, timeout=LAUNCH_TIMEOUT).dump()
    for key, value in degrees.items():
        assert got["layout"][key] == value
    ref = distill_reference.dump()
    assert_same(got, ref)
    assert rel(got["grad_norms"], ref["grad_norms"]) < 1e-5


def test_teacher_with_another_tokenizer_is_refused_by_the_preflight(base_config: dict[str, Any], teacher_model: Path,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The pod's preflight (``launch.main``) run in this process: no interpreter start for a
    refusal (the exit status 78 of a real preflight process is test_train_launch.py's)."""
    from kubeforge_runtime import contract, launch
    from kubeforge_runtime.tiny import build_tokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_model, other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    build_tokenizer(other, vocab_size=400)  # same model shape and vocab_size, another vocabulary
    config = merge(base_config, {**_distill(other), "output": {"uri": f"file://{tmp_path / 'out'}"}})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv(contract.ENV_REPORT_PATH, str(tmp_path / "termination-log"))
    command = [sys.executable, "-m", "kubeforge_runtime.train", "--config", str(path)]
    monkeypatch.setattr(launch.os, "execvp", lambda *_: pytest.fail("the preflight passed and tried to exec"))
    assert launch.main(["--config", str(path), "--", *command]) == contract.EXIT_CONFIG_ERROR
    log = capsys.readouterr().err
    assert "do not share a tokenizer" in log and "vocabularies differ" in log
    assert f"model.uri 'file://{config['model']['uri'][len('file://'):]}'" in log
    assert f"distillation.teacher.uri 'file://{other}'" in log
    assert "do not share a tokenizer" in (tmp_path / "termination-log").read_text()
