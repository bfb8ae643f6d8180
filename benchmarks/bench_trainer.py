"""Trainer throughput: KubeForge's trainer against a plain Hugging Face ``Trainer``, and DP=2 vs DP=1.

What it runs (each in its own process, one after the other, on the same CPU):

1. ``hf``   - ``transformers.Trainer`` on the ``small`` preset (~26 M parameters), fp32, the
   same packed samples, the same batch (global 8, micro 4, accumulation 2), AdamW;
2. ``kf``   - ``python -m kubeforge_runtime.train`` as one process (the same config);
   ``kf-compiled`` - the same with ``training.compile: on``, ``kf-fused`` - the same with
   ``training.fused: on``, ``kf-merged`` / ``kf-unmerged`` - the same with
   ``training.mergedProjections: on`` / ``off``
   (each only when named in ``--runs``);
3. ``kf-dp2`` - the same under ``torchrun --nproc-per-node=2`` (FSDP2 over gloo);
4. ``kf-zero2``, ``kf-zero3`` - the same DP=2 with ``strategy: deepspeed-zero2`` / ``-zero3``
   (skipped when deepspeed is not installed), compared with the FSDP2 DP=2 run.

``--compile`` sets ``training.compile: on`` for the KubeForge runs (each decoder block
compiled); ``--hf-compile`` sets the HF Trainer's ``torch_compile=True`` (the whole model); the
result says which side compiled. ``--runs hf,kf`` limits the runs (default: all).

Each process gets the same total number of CPU threads (``--threads``, default: all cores,
split between the DP=2 workers).

How a run is timed (the same window on both sides): the wall-clock interval from the end of
one optimizer step to the end of the next (the HF Trainer's ``on_step_end`` callback, our
trainer's ``step`` event), so data fetch, collation, logging and callbacks count on both
sides. The first ``WARMUP_STEPS`` steps are left out (first-call allocations, lazy
initialisation); a run's figure is the tokens of one step over the median of the remaining
steps' intervals (since 2026-12-02 13:30 UTC; before: over their mean, still printed as
``mean``): one step slowed by another process's burst no longer moves it. Per run the
log also shows the interval spread (slowest / median timed step), the load average at its
start and end and the involuntary context switches per step of the run's processes
(``getrusage``: how often the scheduler took a core away from them - the measure of
contention from other processes, which 2 OpenMP threads that wait on each other feel
twice). Each side's own narrower window (HF: ``on_step_begin`` to ``on_step_end``, which
leaves out its prefetch of the step's micro-batches; ours: the step's compute and optimizer
step) is printed beside it for diagnosis.

``--repeat N`` interleaves N runs of each side (hf, kf, hf, kf, ...); per side it prints the
median and the min-max of the N runs, and the ratios of the medians and of the bests. The
JSON keeps the best of each side under the old names (``hfTrainerTokensPerSecond``,
``kubeforgeTokensPerSecond``, ``ratioKubeforgeVsHf``) and adds the medians and ranges.
``--hf-allocator keep`` gives the HF worker our one-process glibc setting
(``train/allocator.py``: freed blocks stay in the heap) to tell allocator effects from the
rest. A benchmark, not a test: it reports, it does not assert. ``--quick`` uses the ``tiny``
preset and 6 steps (seconds, for CI).

    python benchmarks/bench_trainer.py [--quick] [--steps N] [--seq-len N] [--threads N] [--repeat N]
                                       [--compile] [--hf-compile] [--hf-allocator keep]
                                       [--runs hf,kf,kf-dp2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "text.jsonl"
log = logging.getLogger("bench_trainer")


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), KUBEFORGE_METRICS_PORT="0",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "trainer_image"), env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _config(model: Path, out: Path, steps: int, seq_len: int, strategy: str = "fsdp", compile_: bool = False,
            hf_compile: bool = False, fused: str = "auto", merged: str = "auto") -> dict:
    return {
        "kind": "FineTuneJob", "name": "bench", "namespace": "default",
        "model": {"uri": f"file://{model}"},
        "dataset": {"uri": f"file://{DATA}", "format": "text", "sequenceLength": seq_len, "packing": True,
                    "validationSplit": 0.0},
        "method": "full",
        "parallelism": {"strategy": strategy},
        "training": {"maxSteps": steps, "globalBatchSize": 8, "microBatchSize": 4, "learningRate": 1e-4, "seed": 0,
                     "compile": "on" if compile_ else "off", "fused": fused, "mergedProjections": merged},
        "hfCompile": hf_compile,  # read by hf_worker only (the HF run's config is never given to our trainer)
        "checkpoint": {"intervalSteps": 0, "keepLast": 1},
        "output": {"uri": f"file://{out}", "format": "merged"},
    }


WARMUP_STEPS = 2
"""Steps left out of every run's figure (first-call allocations, lazy initialisation)."""


@dataclass
class RunTiming:
    """One run's figures: ``window`` = tokens of a step over the median step-end-to-step-end
    interval after the warm-up (the same window on both sides), ``mean`` = the same over
    the mean interval, ``own`` = the median of the side's own per-step tokens/s after the
    warm-up, ``intervals`` = every step-end-to-step-end interval (s), ``spread`` = the
    slowest timed interval over the median one; ``load`` (1-minute load average at the
    run's start and end) and ``switches`` (involuntary context switches per step) are
    filled in by :func:`_measured`."""

    window: float
    mean: float
    own: float
    intervals: list[float]
    spread: float
    load: tuple[float, float] = (0.0, 0.0)
    switches: float = 0.0


def _timing(ends: list[float], own_rates: list[float], tokens_per_step: int) -> RunTiming:
    """A run's :class:`RunTiming` from its step-end times (s, one per optimizer step) and its own per-step rates."""
    if len(ends) <= WARMUP_STEPS + 1:
        raise ValueError(f"{len(ends)} steps timed: need more than the {WARMUP_STEPS} warm-up steps and one "
                         "(raise --steps)")
    timed = len(ends) - WARMUP_STEPS
    span = ends[-1] - ends[WARMUP_STEPS - 1]
    intervals = [b - a for a, b in zip(ends, ends[1:])]
    measured = intervals[WARMUP_STEPS - 1:]  # the intervals that end at a timed step
    median = statistics.median(measured)
    return RunTiming(window=tokens_per_step / median, mean=tokens_per_step * timed / span,
                     own=statistics.median(own_rates[WARMUP_STEPS:]), intervals=[round(v, 3) for v in intervals],
                     spread=max(measured) / median)


def _measured(run, *args) -> RunTiming:  # noqa: ANN001
    """``run(*args)`` with the load average at its start and end and its processes'
    involuntary context switches per optimizer step (children's ``getrusage``)."""
    load0 = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_nivcsw
    t = run(*args)
    t.switches = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_nivcsw - before) / (len(t.intervals) + 1)
    t.load = (load0, os.getloadavg()[0])
    return t


def run_kubeforge(config: Path, nproc: int, threads: int) -> RunTiming:
    """Our trainer's timing, from its own step events (rank 0 writes them; all ranks' tokens per step)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "kubeforge_runtime.train", "--config", str(config)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "kubeforge_runtime.train", "--config", str(config)]
    proc = subprocess.run(cmd, env=_env(max(1, threads // nproc)), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    steps = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
             if line.startswith("KUBEFORGE_EVENT ") and '"event": "step"' in line]
    cfg = json.loads(config.read_text())
    tokens = cfg["training"]["globalBatchSize"] * cfg["dataset"]["sequenceLength"]
    return _timing([e["time"] for e in steps], [e["tokensPerSecond"] for e in steps], tokens)


def hf_worker(config_path: str) -> None:
    """Runs in a subprocess: a plain transformers Trainer on the same samples and batch."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from kubeforge_runtime import data, models

    hf_logging.set_verbosity_error()
    cfg = json.loads(Path(config_path).read_text())
    if cfg.get("hfAllocator") == "keep":
        from kubeforge_runtime.train import allocator

        allocator.keep_freed_memory()
    model_dir = cfg["model"]["uri"].removeprefix("file://")
    tok = models.load_tokenizer(model_dir)
    d = cfg["dataset"]
    prepared = data.prepare(tok, DATA, "text", d["sequenceLength"], True, validation_split=0.0, seed=0)
    # HF shifts labels inside the model: give it the unshifted ones (input ids for text). The
    # position ids make transformers build the same per-record (block-diagonal) mask as ours.
    t = cfg["training"]
    # The same samples in the same global batches and order as our trainer's sampler (every
    # step 8 whole samples): with HF's own shuffling, 35 samples and micro-batch 4, every fifth
    # optimizer step held one micro-batch of 3 samples and still counted as a full step.
    sampler = data.GlobalBatchSampler(len(prepared.train_inputs), t["globalBatchSize"], t["seed"])
    order = [i for step in range(t["maxSteps"]) for i in sampler.global_batch(step)]
    samples = [{"input_ids": prepared.train_inputs[i], "labels": prepared.train_inputs[i].clone(),
                "position_ids": prepared.train_positions[i]} for i in order]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # with a KV cache transformers ignores the packing in position ids
    step_times: list[float] = []
    step_ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            step_times.append(time.perf_counter() - self.t0)
            step_ends.append(time.time())  # the clock of our trainer's step events

    args = TrainingArguments(
        output_dir=str(Path(config_path).parent / "hf-out"), per_device_train_batch_size=t["microBatchSize"],
        gradient_accumulation_steps=t["globalBatchSize"] // t["microBatchSize"], max_steps=t["maxSteps"],
        learning_rate=t["learningRate"], lr_scheduler_type="cosine", warmup_steps=0, logging_strategy="no",
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        torch_compile=bool(cfg.get("hfCompile")), train_sampling_strategy="sequential",
    )
    Trainer(model=model, args=args, train_dataset=samples, callbacks=[Timer()]).train()
    if len(step_ends) != t["maxSteps"]:
        raise RuntimeError(f"the HF Trainer ran {len(step_ends)} optimizer steps, not {t['maxSteps']}")
    tokens = t["globalBatchSize"] * d["sequenceLength"]
    sys.stdout.write(json.dumps({"tokensPerSecond": [tokens / s for s in step_times], "stepEnds": step_ends,
                                 "tokensPerStep": tokens}) + "\n")  # read by run_hf


def run_hf(config: Path, threads: int) -> RunTiming:
    proc = subprocess.run([sys.executable, __file__, "--hf-worker", str(config)], env=_env(threads),
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"HF Trainer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    last = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    return _timing(last["stepEnds"], last["tokensPerSecond"], last["tokensPerStep"])


def _summary(timings: list[RunTiming]) -> dict[str, float]:
    """Median, min and max of a side's runs (common window), and the median of its own window."""
    rates = [t.window for t in timings]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "meanWindowMedian": statistics.median(t.mean for t in timings),
            "ownMedian": statistics.median(t.own for t in timings)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, 6 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repeats; median, min-max and best reported")
    parser.add_argument("--compile", action="store_true", help="training.compile: on for the KubeForge runs")
    parser.add_argument("--hf-compile", action="store_true", help="torch_compile=True for the HF Trainer")
    parser.add_argument("--hf-allocator", choices=("default", "keep"), default="default",
                        help="keep: the HF worker gets our one-process glibc setting (train/allocator.py)")
    parser.add_argument("--runs", default="hf,kf,kf-dp2,kf-zero2,kf-zero3",
                        help="comma-separated subset (hf and kf needed); kf-compiled adds a compiled one-process run, "
                             "kf-fused one with training.fused: on, kf-merged / kf-unmerged one with "
                             "training.mergedProjections: on / off")
    parser.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hf_worker:
        hf_worker(args.hf_worker)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    preset = "tiny" if args.quick else "small"
    steps = args.steps or (6 if args.quick else 12)
    seq_len = args.seq_len or (64 if args.quick else 256)
    sys.path.insert(0, str(REPO / "trainer_image"))
    from kubeforge_runtime.tiny import build_tiny_llama

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        root = Path(tmp)
        model = build_tiny_llama(root / "model", preset=preset, seed=0)
        # One config (and output/checkpoint directory) per run: a shared one would make the
        # second run resume from the first run's final checkpoint and train nothing.
        wanted = set(args.runs.split(","))
        runs = {"hf": "fsdp", "kf": "fsdp", "kf-fused": "fsdp", "kf-merged": "fsdp", "kf-unmerged": "fsdp",
                "kf-compiled": "fsdp", "kf-dp2": "fsdp"}
        try:
            import deepspeed  # noqa: F401

            runs.update({"kf-zero2": "deepspeed-zero2", "kf-zero3": "deepspeed-zero3"})
        except ImportError:
            log.info("deepspeed is not installed: no ZeRO runs (pip install -e .[deepspeed])")
        runs = {name: strategy for name, strategy in runs.items() if name in wanted | {"hf", "kf"}}
        configs = {}
        for name, strategy in runs.items():
            configs[name] = root / f"{name}.json"
            cfg = _config(model, root / name, steps, seq_len, strategy, args.compile or name == "kf-compiled",
                          args.hf_compile, fused="on" if name == "kf-fused" else "auto",
                          merged={"kf-merged": "on", "kf-unmerged": "off"}.get(name, "auto"))
            if name == "hf":
                cfg["hfAllocator"] = args.hf_allocator  # read by hf_worker only
            else:
                cfg.pop("hfCompile")
            configs[name].write_text(json.dumps(cfg))
        log.info("preset %s, %d steps, sequence %d, global batch 8 (micro 4), fp32, %d threads; compiled: KubeForge %s%s, "
                 "HF %s", preset, steps, seq_len, args.threads, args.compile,
                 " (kf-compiled: yes)" if "kf-compiled" in configs else "", args.hf_compile)
        timings: dict[str, list[RunTiming]] = {name: [] for name in configs}
        # Interleaved repeats: on a shared machine the load changes between runs; interleaving
        # gives every side the same share of quiet and loaded minutes.
        for rep in range(args.repeat):
            for name in configs:  # fresh output/checkpoint directories: no resume between repeats
                shutil.rmtree(root / name, ignore_errors=True)
            for name in configs:
                if name == "hf":
                    t = _measured(run_hf, configs[name], args.threads)
                else:
                    t = _measured(run_kubeforge, configs[name],
                                  2 if name in ("kf-dp2", "kf-zero2", "kf-zero3") else 1, args.threads)
                timings[name].append(t)
                log.info("repeat %d %-11s %8.1f tokens/s (mean %8.1f, own window %8.1f); slowest/median step %.2f; "
                         "load %.2f -> %.2f; %.0f involuntary context switches per step (whole run, start-up included); step intervals %s",
                         rep + 1, name, t.window, t.mean, t.own, t.spread, *t.load, t.switches, t.intervals)
    summary = {name: _summary(ts) for name, ts in timings.items()}
    for name, sm in summary.items():
        log.info("%-11s median %8.1f  min-max %8.1f-%8.1f tokens/s  (mean-interval figure: median %8.1f; own window: median %8.1f)  over %d runs; "
                 "/ HF: %.3fx of the medians, %.3fx of the bests", name, sm["median"], sm["min"], sm["max"], sm["meanWindowMedian"],
                 sm["ownMedian"], args.repeat, sm["median"] / summary["hf"]["median"], sm["max"] / summary["hf"]["max"])
    hf, kf = summary["hf"], summary["kf"]
    log.info("KubeForge / HF Trainer: %.3fx of the medians, %.3fx of the bests (HF compiled: %s, KubeForge compiled: %s)",
             kf["median"] / hf["median"], kf["max"] / hf["max"], args.hf_compile, args.compile)
    kfc, dp2 = summary.get("kf-compiled"), summary.get("kf-dp2")
    zero = {name: sm for name, sm in summary.items() if name.startswith("kf-zero")}
    dp2_best = dp2["max"] if dp2 else None  # JSON null when the DP=2 run was not asked for
    result = {"preset": preset, "steps": steps, "sequenceLength": seq_len, "threads": args.threads,
              "repeat": args.repeat, "warmupSteps": WARMUP_STEPS, "hfAllocator": args.hf_allocator,
              "kubeforgeCompiled": args.compile, "hfCompiled": args.hf_compile,
              "hfTrainerTokensPerSecond": round(hf["max"], 1), "kubeforgeTokensPerSecond": round(kf["max"], 1),
              "kubeforgeDp2TokensPerSecond": round(dp2_best, 1) if dp2_best else None,
              "ratioKubeforgeVsHf": round(kf["max"] / hf["max"], 3),
              "ratioKubeforgeVsHfMedian": round(kf["median"] / hf["median"], 3),
              "runs": {name: {key: round(v, 1) for key, v in sm.items()} for name, sm in summary.items()},
              **({"kubeforgeCompiledTokensPerSecond": round(kfc["max"], 1),
                  "ratioKubeforgeCompiledVsHf": round(kfc["max"] / hf["max"], 3),
                  "ratioKubeforgeCompiledVsHfMedian": round(kfc["median"] / hf["median"], 3)} if kfc else {}),
              "ratioDp2VsDp1": round(dp2_best / kf["max"], 3) if dp2_best else None,
              **{f"zero{name[-1]}Dp2TokensPerSecond": round(sm["max"], 1) for name, sm in zero.items()},
              **{f"ratioZero{name[-1]}VsFsdpDp2": round(sm["max"] / dp2_best, 3) if dp2_best else None
                 for name, sm in zero.items()}}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
