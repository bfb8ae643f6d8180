"""Benchmark: a distilled student against the same student trained on the labels alone.

On the real model (SmolLM2-135M-Instruct, the embedded copy), with the runtime's own trainer
(``python -m kubeforge_runtime.train``, one process, as ``kubeforge run`` starts it):

1. the teacher: SmolLM2-135M-Instruct fine-tuned on the sentiment starter the way the main
   job (examples/pipeline.yaml) does it - LoRA r=8 on q/k/v/o, merged output;
2. the student: the teacher's config with fewer decoder layers, initialised from the
   teacher's own layers (``kubeforge_runtime.student``: evenly spaced, first and last kept,
   plus its embeddings, final norm and head);
3. the student trained twice, same steps, data, seed and learning rate: (a) ``method: full``
   on the labels alone, (b) ``method: distill`` from the teacher (``distillation`` below);
4. the held-out task metric (what ``spec.evaluation`` measures: accuracy on the starter's test
   split, never trained on, by greedy generation with ``kubeforge_runtime.evaluate``) of the
   teacher, of the student before training, of (a) and of (b). The runs are trained without
   ``evaluation`` and each model is scored once here, in this process (the trainer would
   score every run's base model again before training: twice the generation time on a
   shared 2-core machine).

Run::

    python benchmarks/bench_distill.py                   # 6-layer student, 40 steps
    python benchmarks/bench_distill.py --quick           # 4-layer student, 10 steps, 40 test records
    python benchmarks/bench_distill.py --layers 8 --steps 60 --temperature 2 --alpha 0.5

Writes a JSON summary with ``--json FILE``. Timings vary with other work on the machine;
the metric does not (greedy decoding, fixed seeds).

Measured on the shared 2-core machine (load average ~20 from other work), teacher = the main
job's output, ``--layers 6 --steps 8 --samples 60 --together``: teacher 0.983, student before
training 0.000, labels only 0.450 (663 s), distilled 0.583 (815 s): distillation +0.133.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))

DATA = REPO / "examples" / "volumes" / "data"
TRAIN = DATA / "text-classification.jsonl"
TEST = DATA / "text-classification-test.jsonl"


def base_config(name: str, model: Path, out: Path, steps: int, lr: float) -> dict[str, Any]:
    """The main job's data, sequence length and batch (examples/pipeline.yaml), fp32, one process."""
    return {
        "kind": "FineTuneJob", "name": name, "namespace": "bench",
        "model": {"uri": f"file://{model}"},
        "dataset": {"uri": f"file://{TRAIN}", "format": "prompt-completion", "sequenceLength": 48,
                    "packing": True, "validationSplit": 0},
        "method": "full",
        "training": {"maxSteps": steps, "globalBatchSize": 8, "microBatchSize": 8, "learningRate": lr,
                     "warmupSteps": 2, "seed": 7, "precision": "fp32"},
        "checkpoint": {"intervalSteps": 0, "keepLast": 1},
        "output": {"uri": f"file://{out}", "format": "merged"},
    }


def accuracy(model_dir: Path, samples: int) -> float:
    """The task metric of ``spec.evaluation`` (accuracy, first ``samples`` test records) on ``model_dir``."""
    import torch

    from kubeforge_runtime import evaluate, models

    model = models.load_causal_lm(str(model_dir), dtype=torch.float32)
    tokenizer = models.load_tokenizer(str(model_dir))
    model.eval()
    began = time.perf_counter()
    result = evaluate.evaluate(model, tokenizer, TEST, "prompt-completion", "accuracy", samples)
    print(f"  accuracy of {model_dir.name}: {result['value']:.3f} on {result['samples']} records "
          f"({time.perf_counter() - began:.0f} s)", flush=True)
    return float(result["value"])


def train(work: Path, name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Run the trainer on ``config``; return its output directory, final loss and wall time."""
    return finish(start(work, name, config))


def start(work: Path, name: str, config: dict[str, Any]) -> tuple[str, dict[str, Any], Path, subprocess.Popen[bytes], float]:
    """Start the trainer on ``config`` (``python -m kubeforge_runtime.train``, one process)."""
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"
    cfg_path.write_text(json.dumps(config, indent=1))
    env = {**os.environ, "KUBEFORGE_METRICS_PORT": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "trainer_image"), env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log = (run_dir / "log.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "kubeforge_runtime.train", "--config", str(cfg_path)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return name, config, run_dir, proc, time.perf_counter()


def finish(started: tuple[str, dict[str, Any], Path, subprocess.Popen[bytes], float]) -> dict[str, Any]:
    """Wait for a started run; its output directory, final loss and wall time."""
    name, config, run_dir, proc, began = started
    proc.wait()
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        tail = (run_dir / "log.txt").read_text(errors="replace")[-4000:]
        raise SystemExit(f"{name}: trainer exited {proc.returncode}\n{tail}")
    out = Path(config["output"]["uri"][len("file://"):])
    record = json.loads((out / "kubeforge.json").read_text())
    print(f"  {name}: {seconds:.0f} s, {record.get('steps')} steps, final loss {record.get('finalLoss'):.4f}", flush=True)
    return {"seconds": round(seconds, 1), "finalLoss": record.get("finalLoss"), "output": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="student decoder layers (the teacher has 30)")
    parser.add_argument("--steps", type=int, default=40, help="student optimizer steps (batch 8)")
    parser.add_argument("--teacher-steps", type=int, default=8, help="LoRA steps of the teacher (the main job's 8)")
    parser.add_argument("--lr", type=float, default=5e-4, help="student learning rate (both runs)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the label loss in the distilled run")
    parser.add_argument("--samples", type=int, default=100, help="held-out test records scored")
    parser.add_argument("--base-accuracy", action="store_true", help="also score the teacher's base model")
    parser.add_argument("--together", action="store_true",
                        help="train the two students at the same time (same results; wall times overlap)")
    parser.add_argument("--quick", action="store_true", help="4 layers, 10 steps, 40 test records")
    parser.add_argument("--model", default=None, help="teacher's base model directory (default: the embedded copy)")
    parser.add_argument("--teacher", default=None,
                        help="an already fine-tuned teacher (a merged output directory, e.g. the main job's "
                             "pvc/models/sentiment-ft from `kubeforge run -f examples/pipeline.yaml`) instead of "
                             "training one here")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="also write the summary to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.steps, args.samples = 4, 10, 40

    from kubeforge_runtime import embedded
    from kubeforge_runtime.student import build_student

    base = Path(args.model) if args.model else (None if args.teacher else embedded.ensure())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-distill-"))
    began = time.perf_counter()
    try:
        if args.teacher:
            teacher_dir = Path(args.teacher)
            record = json.loads((teacher_dir / "kubeforge.json").read_text())
            print(f"teacher: {teacher_dir} ({record.get('method')}, {record.get('steps')} steps, "
                  f"{record.get('format')})", flush=True)
            teacher = {"seconds": None, "finalLoss": record.get("finalLoss"), "output": str(teacher_dir)}
        else:
            print(f"teacher: {base.name} + LoRA r=8 (q/k/v/o), {args.teacher_steps} steps, merged", flush=True)
            tcfg = base_config("teacher", base, work / "teacher-out", args.teacher_steps, 0.002)
            tcfg.update(method="lora", lora={"r": 8, "alpha": 16, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
            teacher = train(work, "teacher", tcfg)
            teacher_dir = Path(teacher["output"])
        teacher["accuracy"] = accuracy(teacher_dir, args.samples)
        base_accuracy = accuracy(base, args.samples) if args.base_accuracy and base is not None else None

        student_dir = build_student(teacher_dir, work / "student-init", args.layers)
        kept = json.loads((student_dir / "kubeforge-student.json").read_text())["layers"]
        print(f"student: {len(kept)} of the teacher's 30 layers {kept}; {args.steps} steps, lr {args.lr}", flush=True)
        student_before = accuracy(student_dir, args.samples)
        lcfg = base_config("student-labels", student_dir, work / "labels-out", args.steps, args.lr)
        dcfg = base_config("student-distill", student_dir, work / "distill-out", args.steps, args.lr)
        dcfg.update(method="distill", distillation={"teacher": {"uri": f"file://{teacher_dir}"},
                                                    "temperature": args.temperature, "alpha": args.alpha})
        if args.together:  # both at once: wall times then include each other's load
            runs = [start(work, "student-labels", lcfg), start(work, "student-distill", dcfg)]
            labels, distilled = (finish(r) for r in runs)
        else:
            labels = train(work, "student-labels", lcfg)
            distilled = train(work, "student-distill", dcfg)
        labels["accuracy"] = accuracy(Path(labels["output"]), args.samples)
        distilled["accuracy"] = accuracy(Path(distilled["output"]), args.samples)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    summary = {
        "layers": kept, "steps": args.steps, "lr": args.lr, "temperature": args.temperature, "alpha": args.alpha,
        "samples": args.samples, "teacher": teacher, "teacherBase": base_accuracy, "studentBefore": student_before,
        "labelsOnly": labels, "distilled": distilled, "seconds": round(time.perf_counter() - began, 1),
    }
    print()
    print(f"held-out accuracy on {args.samples} test reviews (sentiment starter), student = {len(kept)} layers:")
    print(f"  {'model':38} {'accuracy':>9} {'train s':>8}")
    if base_accuracy is not None:
        print(f"  {'teacher base (SmolLM2-135M-Instruct)':38} {base_accuracy:>9.3f}")
    tsec = f"{teacher['seconds']:>8.0f}" if teacher["seconds"] is not None else f"{'(given)':>8}"
    print(f"  {'teacher (LoRA, merged)':38} {teacher['accuracy']:>9.3f} {tsec}")
    print(f"  {'student before training':38} {student_before:>9.3f}")
    print(f"  {'student, labels only (baseline)':38} {labels['accuracy']:>9.3f} {labels['seconds']:>8.0f}")
    print(f"  {'student, distilled':38} {distilled['accuracy']:>9.3f} {distilled['seconds']:>8.0f}")
    diff = distilled["accuracy"] - labels["accuracy"]
    print(f"distilled - labels only: {diff:+.3f} ({'distillation wins' if diff > 0 else 'distillation does not win'})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
