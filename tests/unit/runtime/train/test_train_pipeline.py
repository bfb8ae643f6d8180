"""Pipeline stages under FSDP2 (train/pipeline.py): no unit stays gathered between micro-batches.

Runs torch's real pipelining schedule on a real FSDP2 module in a child process (a gloo world
of one: one stage, one data-parallel rank, which is enough for FSDP2 to gather and reshard)
and records, after every micro-batch's backward, which units are still gathered. torch's own
``PipelineStage`` is run beside it as the contrast: it keeps every unit gathered until the
step ends (what made the 1 B model's pipeline ranks hold their whole stage, see pipeline.py).
The gradients of both must be the same. What a whole run computes under PP x DP is compared
with one process by test_train_distributed.py (pp2xdp2, pp2xdp2-gpipe).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from train_support import child_env

CHILD = r"""
import json, os, socket, sys
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe, Schedule1F1B
from kubeforge_runtime.train import pipeline

with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))

def run(mine, schedule_name):
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
    net = nn.Sequential(*layers)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(net, mesh=mesh, reshard_after_forward=True)
    loss_fn = lambda out, target: ((out - target) ** 2).sum()
    if mine:
        schedule = pipeline.build_schedule(net, 0, 1, torch.device("cpu"), mesh.get_group(), schedule_name, 4, loss_fn)
        stage = schedule._stage
    else:
        stage = PipelineStage(net, 0, 1, torch.device("cpu"), group=mesh.get_group())
        cls = ScheduleGPipe if schedule_name == "GPipe" else Schedule1F1B
        schedule = cls(stage, n_microbatches=4, loss_fn=loss_fn, scale_grads=False)
    gathered = []
    backward = stage.backward_one_chunk
    def recording(*args, **kwargs):
        out = backward(*args, **kwargs)
        gathered.append([layer._get_fsdp_state()._fsdp_param_group.is_unsharded for layer in layers])
        return out
    stage.backward_one_chunk = recording
    x, y = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(8, 16)
    losses = []
    schedule.step(x, target=y, losses=losses, return_outputs=False)
    after = [layer._get_fsdp_state()._fsdp_param_group.is_unsharded for layer in layers]
    grads = [p.grad.full_tensor().flatten().tolist() for p in net.parameters()]
    return {"gathered": gathered, "after": after, "grads": grads, "loss": float(sum(losses))}

print(json.dumps({"mine": run(True, sys.argv[1]), "torch": run(False, sys.argv[1])}))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B"])
def test_fsdp_units_are_resharded_after_every_micro_batch_backward(schedule: str) -> None:
    done = subprocess.run([sys.executable, "-c", CHILD, schedule], env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    mine, theirs = result["mine"], result["torch"]
    assert len(mine["gathered"]) == 4  # one record per micro-batch
    assert not any(any(units) for units in mine["gathered"]), mine["gathered"]
    assert not any(mine["after"])
    # The contrast: torch's stage holds every unit gathered from the first backward on.
    assert all(all(units) for units in theirs["gathered"]), theirs["gathered"]
    assert not any(theirs["after"])  # ... and reshards after the last micro-batch
    # The same gradients (accumulated over the four micro-batches, reduced once).
    assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    for a, b in zip(mine["grads"], theirs["grads"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


def test_a_pipeline_stage_builds_and_reads_only_its_own_layers(tiny_model) -> None:
    """The last of two stages, as the trainer builds it: the model on the meta device, cut to
    the stage (``prune_to_stage``), then allocated and read (``loading.materialize``, one
    process): only its layers, the final norm and ``lm_head`` ever get storage, and they hold
    exactly the stored weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubeforge_runtime.train import model as model_mod
    from kubeforge_runtime.train.config import parse_config
    from kubeforge_runtime.train.loading import materialize
    from kubeforge_runtime.train.parallelize import prune_to_stage

    cfg = parse_config({"model": {"uri": f"file://{tiny_model}"}, "dataset": {"uri": "file:///data/train.jsonl"},
                        "output": {"uri": "file:///out/model"}, "method": "full"})
    top, lm = model_mod.build_meta(cfg, tiny_model)
    n = lm.config.num_hidden_layers
    assert n >= 2 and all(p.is_meta for p in top.parameters())  # nothing allocated yet
    mine = range(n // 2, n)
    prune_to_stage(lm, mine, is_first=False, is_last=True)
    materialize(top, lm, tiny_model, torch.device("cpu"), seed=0)
    whole = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).state_dict()
    want = {k for k in whole if k.startswith(("model.norm.", "lm_head.")) or
            any(k.startswith(f"model.layers.{i}.") for i in mine)}
    got = dict(top.named_parameters())
    assert set(got) == want
    for name, value in got.items():
        assert not value.is_meta and torch.equal(value, whole[name]), name
