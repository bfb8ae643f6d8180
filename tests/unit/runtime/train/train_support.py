"""Helpers for the training runtime tests (launching, comparing); see conftest.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[4]
DATA = REPO / "examples" / "data"
STEPS = 4
LORA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", KUBEFORGE_METRICS_PORT="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "trainer_image"), env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, config: Path, *extra: str) -> list[str]:
    """The pod's torchrun command (rendezvous on loopback instead of the headless Service).

    The rendezvous store binds port 0 (the kernel's free port, taken atomically by the agent),
    not a port picked here and released: torch's c10d backend, when the port it should host is
    already taken, silently becomes a *client* of whatever store listens there. With a picked
    port, a concurrent launch (CI runs three lanes) could take the same one first; this agent
    then rendezvoused on the other run's store and failed ("connection to the C10d store has
    failed") when that run ended - stop 31's CI failure of a ZeRO-3 layout test. One node only,
    so no other agent needs to know the port.
    """
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id=test-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        *extra, "-m", "kubeforge_runtime.train", "--config", str(config),
    ]


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


class Run:
    """One launch: its directory, config, dump and logs."""

    def __init__(self, root: Path, name: str, config: dict[str, Any]) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        config = merge(config, {"output": {"uri": f"file://{self.dir / 'out'}"}})
        self.config = config
        self.config_path = self.dir / "config.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.dump_path = self.dir / "dump.pt"
        self.log_path = self.dir / "log.txt"
        self.returncode: int | None = None

    @property
    def out(self) -> Path:
        return self.dir / "out"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def dump(self) -> dict[str, Any]:
        import torch

        assert self.dump_path.exists(), f"no dump written; log tail:\n{self.log()[-6000:]}"
        return torch.load(self.dump_path, weights_only=False)

    def execute(self, cmd: list[str], env: dict[str, str], timeout: float = 240, expect: int | None = 0) -> "Run":
        with self.log_path.open("ab") as fh:
            proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=self.dir)
        self.returncode = proc.returncode
        if expect is not None:
            assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect}); log tail:\n{self.log()[-6000:]}"
        return self


def rel(a: Any, b: Any) -> float:
    """Relative difference ||a - b|| / ||b|| (of tensors, or of lists of numbers)."""
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same(got: dict[str, Any], ref: dict[str, Any], *, params_tol: float = 1e-5, tol: float = 1e-5,
                grads: bool = True) -> None:
    """Losses, first-step gradients and final parameters of a run equal the reference's."""
    assert len(got["losses"]) == len(ref["losses"]) == STEPS
    assert rel(got["losses"], ref["losses"]) < tol, (got["losses"], ref["losses"])
    if grads:
        assert set(got["grads"]) == set(ref["grads"]) and ref["grads"]
        worst = max((rel(got["grads"][k], ref["grads"][k]), k) for k in ref["grads"])
        assert worst[0] < tol, f"gradient {worst[1]} differs by {worst[0]:.2e}"
    assert set(got["params"]) == set(ref["params"])
    worst = max((rel(got["params"][k], ref["params"][k]), k) for k in ref["params"])
    assert worst[0] < params_tol, f"parameter {worst[1]} differs by {worst[0]:.2e} after {STEPS} steps"


def record_batch(tok: Any, fmt: str, packing: bool, seq_len: int = 48, rows: int = 3) -> tuple[Any, ...]:
    """``rows`` samples (input ids, labels, position ids) of the first 12 records of the shipped
    ``text`` or prompt-completion set, packed or padded to ``seq_len``."""
    from kubeforge_runtime import data as D

    recs = [r.data for r in D.load_records(DATA / ("text.jsonl" if fmt == "text" else "prompt_completion.jsonl"), fmt)]
    pairs = [D.tokenize_record(tok, r, fmt) for r in recs[:12]]
    x, y, pos = D.build_samples(pairs, seq_len, packing=packing, pad_id=tok.pad_token_id or 0)
    return x[:rows], y[:rows], pos[:rows]


def training_copies(model_dir: Path, n: int = 2) -> list[Any]:
    """``n`` fresh fp32 copies of the model in ``model_dir`` as the trainer runs it: train mode,
    no KV cache, sdpa attention."""
    import torch

    from kubeforge_runtime import models

    lms = []
    for _ in range(n):
        lm = models.load_causal_lm(model_dir, dtype=torch.float32).train()
        lm.config.use_cache = False
        lm.set_attn_implementation("sdpa")
        lms.append(lm)
    return lms
