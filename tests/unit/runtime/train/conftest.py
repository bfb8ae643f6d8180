"""Fixtures for the training runtime tests: a tiny model, configs, and real launches.

Every distributed test launches the trainer exactly as the pod does (``torchrun ... -m
kubeforge_runtime.train --config FILE``, optionally through ``kubeforge_runtime.launch``),
with ``KUBEFORGE_TRAIN_DUMP`` set so that rank 0 writes what it computed (losses,
first-step gradients, final parameters, probe logits). Tests compare those numbers against
a reference run of the same trainer as a single process on the whole global batch.

On two cores every process counts: one thread per process, the ``tiny`` preset, 4 steps.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from train_support import DATA, LORA_ALL, STEPS, Run, child_env, merge, torchrun_cmd


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubeforge_runtime.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def base_config(tiny_model: Path) -> dict[str, Any]:
    """The shared training config: tiny model, text data, 4 steps of global batch 8."""
    return {
        "kind": "FineTuneJob", "name": "test", "namespace": "default",
        "model": {"uri": f"file://{tiny_model}"},
        "dataset": {"uri": f"file://{DATA / 'text.jsonl'}", "format": "text", "sequenceLength": 32,
                    "packing": True, "validationSplit": 0.1},
        "method": "full",
        "parallelism": {"tensor": 1, "pipeline": 1, "strategy": "fsdp", "pipelineSchedule": "1F1B"},
        "training": {"maxSteps": STEPS, "globalBatchSize": 8, "microBatchSize": 2, "learningRate": 1e-3,
                     "warmupSteps": 1, "seed": 42},
        "checkpoint": {"intervalSteps": 0, "keepLast": 2},
        "output": {"uri": "file:///unset", "format": "merged"},
    }


@pytest.fixture(scope="session")
def launcher(tmp_path_factory: pytest.TempPathFactory, base_config: dict[str, Any]) -> Callable[..., Run]:
    """launcher(name, overrides, nproc=0 (plain process) | N (torchrun), env=..., expect=0, timeout=240 s)."""
    root = tmp_path_factory.mktemp("runs")
    cache: dict[str, Run] = {}

    def launch(name: str, overrides: dict[str, Any] | None = None, nproc: int = 0, *, env: dict[str, str] | None = None,
               expect: int | None = 0, torchrun_args: tuple[str, ...] = (), via_launch: bool = False,
               dump: bool = True, timeout: float = 240) -> Run:
        if name in cache:  # several tests look at one launch (launches are the slow part)
            return cache[name]
        run = Run(root, name, merge(base_config, overrides or {}))
        extra = {"KUBEFORGE_TRAIN_DUMP": str(run.dump_path)} if dump else {}
        extra.update(env or {})
        if nproc == 0:
            cmd = [sys.executable, "-m", "kubeforge_runtime.train", "--config", str(run.config_path)]
        else:
            cmd = torchrun_cmd(nproc, run.config_path, *torchrun_args)
        if via_launch:
            cmd = [sys.executable, "-m", "kubeforge_runtime.launch", "--config", str(run.config_path), "--", *cmd]
        cache[name] = run.execute(cmd, child_env(**extra), timeout=timeout, expect=expect)
        return run

    return launch


@pytest.fixture(scope="session")
def reference(launcher: Callable[..., Run]) -> Run:
    """One process, whole global batch, full fine-tuning: what every layout must reproduce."""
    return launcher("reference-full")


@pytest.fixture(scope="session")
def lora_reference(launcher: Callable[..., Run]) -> Run:
    """One process LoRA (adapters on every linear layer, so TP splits both kinds)."""
    return launcher("reference-lora", {"method": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": LORA_ALL},
                                       "output": {"format": "adapter"}})


