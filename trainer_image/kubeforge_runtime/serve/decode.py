"""How the server runs a model's forward pass: eager, ``torch.compile``d, CUDA graphs.

One decision, :func:`decode_plan`, from ``engine.compile`` (``auto``/``on``/``off``) and the
device, used by everyone who runs a served model's forward pass:

* the ``continuous`` engine turns it into ``ContinuousBatchingConfig`` settings
  (:meth:`DecodePlan.continuous_batching_kwargs`): transformers compiles the batch step
  (``varlen_compile_config``) and captures CUDA graphs itself, during the engine's warm-up;
* the ``dynamic`` engine runs eager whatever the setting (:meth:`DecodePlan.without_compile`):
  compiling its forward over a growing ``DynamicCache`` recompiled at every decode step and
  did not finish its warm-up within 5 minutes on the tiny test model here;
* the QuantizeJob (``quantize/metrics.py``) times decoding through the serving engine built
  with the same plan, and writes :meth:`DecodePlan.describe` into its report, so the latency
  it reports is the latency the server will show.

Both engines compile (and capture graphs) in ``warmup()``, which the server runs before
``/ready`` turns 200: no client pays for compilation.

What ``auto`` means follows measurements, not assumptions: on CUDA, turning on the CUDA
graphs of transformers' continuous batching (nothing else changed) took a 0.5 B model on an
H200 from 41 to 128 tokens/s at one client and from 954 to 3,739 at 64 (issue 14; not
re-measured here: no GPU in this session), so they are on. On CPU, compiling the batch step
(transformers compiles the varlen path; its paged attention stays a graph break, and the
fast decode path needs flash attention on CUDA) measured between no gain and 1.57x at batch 1
for fp32, 1.06x at batch 8, and slower for int8 weight-only, on the heavily loaded 2-core
development machine (README "Measured", serving: compiled decode), while the compiled
warm-up took 4-18 minutes there; so ``auto`` stays eager on CPU and ``on`` compiles anyway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

CompileSetting = Literal["auto", "on", "off"]

CPU_AUTO_COMPILES = False
"""Whether ``compile: auto`` compiles on CPU: only where it measured faster (see the module
docstring and README "Measured", serving: compiled decode)."""


@dataclass(frozen=True)
class DecodePlan:
    """What the engines do with a model's forward pass on one device."""

    setting: CompileSetting
    """The ``engine.compile`` this plan came from."""
    device: str
    """``cpu`` or ``cuda``."""
    compile: bool
    """torch.compile the forward (inductor, dynamic shapes), compiled during warm-up."""
    cuda_graphs: bool
    """Capture CUDA graphs of the batch step (CUDA only)."""
    note: str = ""
    """Why the plan differs from what the setting asks, if it does."""

    def describe(self) -> str:
        """One line for reports and logs, e.g. ``cpu, torch.compile (engine.compile: on)``."""
        parts = []
        if self.compile:
            parts.append("torch.compile")
        if self.cuda_graphs:
            parts.append("CUDA graphs")
        how = " + ".join(parts) if parts else "eager"
        note = f"; {self.note}" if self.note else ""
        return f"{self.device}, {how} (engine.compile: {self.setting}{note})"

    def without_compile(self, why: str) -> "DecodePlan":
        """This plan run eagerly (no compile, no graphs), saying ``why`` when it asked for more."""
        if not (self.compile or self.cuda_graphs):
            return self
        return DecodePlan(self.setting, self.device, compile=False, cuda_graphs=False, note=why)

    def compile_config(self) -> Any:
        """transformers' ``CompileConfig`` for the compiled path, or None when eager."""
        if not self.compile:
            return None
        from transformers import CompileConfig

        # "default" mode: the paged attention is a graph break (torch.compiler.disable), so
        # fullgraph is impossible, and "reduce-overhead" would bring inductor's own CUDA graphs,
        # which transformers recommends against beside its own. dynamic=True: batch and KV
        # lengths vary every step; without it every new shape recompiles.
        return CompileConfig(mode="default", fullgraph=False, dynamic=True)

    def continuous_batching_kwargs(self) -> dict[str, Any]:
        """``ContinuousBatchingConfig`` keyword arguments for this plan."""
        kwargs: dict[str, Any] = {"use_cuda_graph": self.cuda_graphs}
        config = self.compile_config()
        if config is not None:
            kwargs["varlen_compile_config"] = config
            if self.device == "cuda":  # the fast decode path exists only with flash attention on CUDA
                kwargs["decode_compile_config"] = config
        if self.compile or self.cuda_graphs:
            # Compiled and graphed steps are padded to these multiples (tokens); transformers'
            # defaults (64 query tokens, 16384 KV tokens) are sized for GPUs and would make a CPU
            # decode step of one token compute 64.
            kwargs["q_padding_interval_size"] = 64 if self.cuda_graphs else 1
            kwargs["kv_padding_interval_size"] = 64 * 256 if self.cuda_graphs else 16
        return kwargs


def decode_plan(setting: CompileSetting, device: str) -> DecodePlan:
    """The plan for ``engine.compile`` on ``device`` (``cpu`` or ``cuda``); see the module docstring."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"engine.compile must be auto, on or off, not {setting!r}")
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if setting == "off":
        return DecodePlan(setting, kind, compile=False, cuda_graphs=False)
    if kind == "cuda":
        return DecodePlan(setting, kind, compile=setting == "on", cuda_graphs=True)
    return DecodePlan(setting, kind, compile=setting == "on" or CPU_AUTO_COMPILES, cuda_graphs=False)
