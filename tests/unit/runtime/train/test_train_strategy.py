"""The data-parallel strategy table (train/strategy.py): names, errors, lazy DeepSpeed (no process group).

What each strategy computes is compared against one process by test_train_distributed.py
(FSDP, DDP) and test_train_zero.py (ZeRO 1-3).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from train_support import child_env

from kubeforge_runtime.train import strategy
from kubeforge_runtime.train.config import ConfigError, parse_config

CONFIG = {"model": {"uri": "file:///models/base"}, "dataset": {"uri": "file:///data/train.jsonl"},
          "output": {"uri": "file:///out/model"}}


@pytest.mark.parametrize("name, cls", [
    ("fsdp", strategy.FSDPStrategy), ("ddp", strategy.DDPStrategy),
    ("deepspeed-zero1", strategy.ZeROStrategy), ("deepspeed-zero2", strategy.ZeROStrategy),
    ("deepspeed-zero3", strategy.ZeROStrategy),
])
def test_every_config_strategy_has_its_implementation(name: str, cls: type) -> None:
    assert strategy.strategy_class(name) is cls
    cfg = parse_config({**CONFIG, "parallelism": {"strategy": name}})
    built = strategy.build(cfg, None, None)  # type: ignore[arg-type]  # building touches no mesh
    assert type(built) is cls and built.name == name


def test_unknown_strategy_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"'horovod' is not supported.*fsdp, ddp, deepspeed-zero1"):
        strategy.strategy_class("horovod")
    with pytest.raises(ConfigError, match="not supported"):
        strategy.check_available("horovod")


def test_deepspeed_is_imported_for_zero_only() -> None:
    """The trainer, the table and the FSDP/DDP strategies import no DeepSpeed; ZeRO's availability check does."""
    code = """
import sys
from kubeforge_runtime.train import strategy, trainer
from kubeforge_runtime.train.config import parse_config
base = {"model": {"uri": "m"}, "dataset": {"uri": "d"}, "output": {"uri": "o"}}
for name in ("fsdp", "ddp"):
    strategy.check_available(name)
    strategy.build(parse_config({**base, "parallelism": {"strategy": name}}), None, None)
assert "deepspeed" not in sys.modules, "imported by fsdp/ddp"
strategy.build(parse_config({**base, "parallelism": {"strategy": "deepspeed-zero2"}}), None, None)
assert "deepspeed" not in sys.modules, "imported before a ZeRO run needs it"
strategy.check_available("deepspeed-zero2")
assert "deepspeed" in sys.modules
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
