"""Benchmark: int8 matmul kernels against fp32 on this CPU, one decoder layer's linears.

Issue 13 asks for int8 decoding at batch 1 at least 1.5x faster than fp32 through the server.
Whether any int8 kernel on this CPU can give that is a question about kernels before it is one
about the server, so this measures the kernels alone: the seven linears of one SmolLM2-135M
decoder layer (hidden 576, 9 query and 3 key/value heads of 64, MLP 1536), chained as the layer
chains them (q/k/v from x, o from q, gate/up from o, down from gate*up), at batch 1 and 8, for

* ``fp32`` eager (``torch.nn.Linear``) and ``torch.compile``d,
* torchao ``Int8WeightOnlyConfig`` (the QuantizeJob's int8-weight-only) eager and compiled,
* torchao ``Int8DynamicActivationInt8WeightConfig`` (int8-dynamic) eager and compiled,
* aten's own CPU int8 weight-only kernel, ``torch.ops.aten._weight_int8pack_mm`` (int8 weights,
  one fp32 scale per output row), eager,

timed in interleaved rounds (every path once per round, median per path) so a shared machine's
slow moments hit all paths alike, and printed with the CPU's ISA facts (torch's CPU capability
and the ``/proc/cpuinfo`` int8 dot-product flags, ``kubeforge_runtime.quantize.speed``), so the
README's claim about int8 speed on this CPU can be re-run anywhere. Compiled paths use inductor
with ``freezing`` (weights as constants: what lets inductor pick oneDNN int8 kernels), compiled
before timing; the compile time is printed.

Run::

    python benchmarks/bench_int8_kernels.py                 # batch 1 and 8
    python benchmarks/bench_int8_kernels.py --quick         # fewer calls (CI)
    python benchmarks/bench_int8_kernels.py --no-compile    # eager paths only (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))

from kubeforge_runtime.quantize import speed  # noqa: E402

log = logging.getLogger("bench_int8_kernels")

HIDDEN, KV, MLP = 576, 192, 1536  # SmolLM2-135M: hidden 576, 3 kv heads x 64, intermediate 1536


def decoder_linears() -> Any:
    """One SmolLM2-135M decoder layer's linears (fp32, random weights), chained as the layer does."""
    import torch

    class DecoderLinears(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.k_proj = torch.nn.Linear(HIDDEN, KV, bias=False)
            self.v_proj = torch.nn.Linear(HIDDEN, KV, bias=False)
            self.o_proj = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.gate_proj = torch.nn.Linear(HIDDEN, MLP, bias=False)
            self.up_proj = torch.nn.Linear(HIDDEN, MLP, bias=False)
            self.down_proj = torch.nn.Linear(MLP, HIDDEN, bias=False)

        def forward(self, x: Any) -> Any:
            q = self.q_proj(x)
            kv = self.k_proj(x) + self.v_proj(x)  # keeps both in the graph
            o = self.o_proj(q)
            mlp = torch.nn.functional.silu(self.gate_proj(o)) * self.up_proj(o)
            return self.down_proj(mlp) + kv.sum(-1, keepdim=True)

    torch.manual_seed(0)
    return DecoderLinears().eval()


class Int8PackLinear:
    """``Linear`` through ``aten._weight_int8pack_mm``: int8 weights, one fp32 scale per output row."""

    @staticmethod
    def swap(module: Any) -> Any:
        import torch

        class _Q8(torch.nn.Module):
            def __init__(self, linear: Any) -> None:
                super().__init__()
                w = linear.weight.detach()
                scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
                self.register_buffer("w", torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8).contiguous())
                self.register_buffer("s", scale.to(torch.float32))

            def forward(self, x: Any) -> Any:
                shape = x.shape
                return torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.w, self.s).reshape(*shape[:-1], -1)

        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, _Q8(child))
        return module


def build_paths(compile_: bool) -> dict[str, Callable[[], Any]]:
    """name -> builder of a module for each kernel path (built lazily: compiling takes long)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    def torchao(config: Any) -> Callable[[], Any]:
        def build() -> Any:
            module = decoder_linears()
            quantize_(module, config)
            return module
        return build

    paths: dict[str, Callable[[], Any]] = {
        "fp32 eager": decoder_linears,
        "int8-weight-only eager (torchao)": torchao(Int8WeightOnlyConfig()),
        "int8-dynamic eager (torchao)": torchao(Int8DynamicActivationInt8WeightConfig()),
        "int8 _weight_int8pack_mm eager (aten)": lambda: Int8PackLinear.swap(decoder_linears()),
    }
    if compile_:
        paths["fp32 compiled"] = decoder_linears
        paths["int8-weight-only compiled (torchao)"] = torchao(Int8WeightOnlyConfig())
        paths["int8-dynamic compiled (torchao)"] = torchao(Int8DynamicActivationInt8WeightConfig())
    return paths


def _time_calls(fn: Callable[[], Any], calls: int) -> float:
    """Microseconds per call over ``calls`` calls."""
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) * 1e6 / calls


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    cpu = speed.host_cpu()
    rows: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        inputs = {b: torch.randn(b, HIDDEN) for b in args.batches}
        reference = decoder_linears()
        callables: dict[tuple[str, int], Callable[[], Any]] = {}
        for name, build in build_paths(args.compile).items():
            module = build()
            row = rows.setdefault(name, {})
            for batch, x in inputs.items():
                fn = module
                if "compiled" in name:
                    fn = torch.compile(copy.deepcopy(module) if batch != args.batches[0] else module, dynamic=False)
                started = time.perf_counter()
                try:
                    out = fn(x)
                    fn(x)
                except Exception as exc:  # a path the installed torch/torchao cannot run here: say so, go on
                    row[f"b{batch}Error"] = str(exc).splitlines()[0][:200]
                    log.warning("%s batch %d failed: %s", name, batch, row[f"b{batch}Error"])
                    continue
                row[f"b{batch}FirstCallSeconds"] = time.perf_counter() - started
                row[f"b{batch}MaxAbsErrorVsFp32"] = float((out - reference(x)).abs().max())
                log.info("%s batch %d ready in %.1f s", name, batch, row[f"b{batch}FirstCallSeconds"])
                callables[(name, batch)] = lambda fn=fn, x=x: fn(x)
        runs: dict[tuple[str, int], list[float]] = {key: [] for key in callables}
        for round_ in range(args.rounds):
            for key, fn in callables.items():
                runs[key].append(_time_calls(fn, args.calls))
            log.info("round %d/%d done", round_ + 1, args.rounds)
    for (name, batch), values in runs.items():
        rows[name][f"b{batch}Us"] = statistics.median(values)
        rows[name][f"b{batch}UsRuns"] = values
    return {"cpu": {"capability": cpu.capability, "int8DotFlags": list(cpu.int8_dot), "describe": cpu.describe(),
                    "avx512": sorted(f for f in cpu.flags if f.startswith("avx512")),
                    "modelName": _model_name()},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
            "settings": {"batches": args.batches, "calls": args.calls, "rounds": args.rounds, "compile": args.compile}}


def _model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def render(result: dict[str, Any]) -> str:
    batches = result["settings"]["batches"]
    rows = result["rows"]
    head = f"{'path':<40}" + "".join(f" {f'b{b} us/call':>12} {'vs fp32 eager':>13} {'vs fp32 comp.':>13}" for b in batches)
    lines = [head, "-" * len(head)]
    for name, row in rows.items():
        line = f"{name:<40}"
        for b in batches:
            v = row.get(f"b{b}Us")
            eager = rows["fp32 eager"].get(f"b{b}Us")
            comp = rows.get("fp32 compiled", {}).get(f"b{b}Us")
            if v is None:
                line += f" {'failed':>12} {'':>13} {'':>13}"
                continue
            line += f" {v:>12.1f} {eager / v:>12.2f}x" + (f" {comp / v:>12.2f}x" if comp else f" {'':>13}")
        lines.append(line)
    cpu = result["cpu"]
    lines.append(
        f"\nCPU: {cpu['modelName']}; {cpu['describe']}; AVX-512 flags: {', '.join(cpu['avx512']) or 'none'}; "
        f"torch {result['torch']}, {result['threads']} threads. One SmolLM2-135M decoder layer's 7 linears "
        f"({HIDDEN}x{HIDDEN} q/o, {HIDDEN}x{KV} k/v, {HIDDEN}x{MLP} gate/up, {MLP}x{HIDDEN} down), random weights; "
        f"median of {result['settings']['rounds']} interleaved rounds of {result['settings']['calls']} calls; "
        f"'x' > 1 = faster than fp32.")
    for name, row in rows.items():
        firsts = ", ".join(f"b{b} {row[f'b{b}FirstCallSeconds']:.1f} s" for b in batches if f"b{b}FirstCallSeconds" in row)
        errs = ", ".join(f"b{b} {row[f'b{b}MaxAbsErrorVsFp32']:.3g}" for b in batches if f"b{b}MaxAbsErrorVsFp32" in row)
        fails = "; ".join(f"b{b} failed: {row[f'b{b}Error']}" for b in batches if f"b{b}Error" in row)
        lines.append(f"  {name}: first two calls (compile) {firsts}; max |out - fp32| {errs}" + (f"; {fails}" if fails else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--calls", type=int, default=200, help="calls per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--quick", action="store_true", help="20 calls x 3 rounds")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager paths only")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.rounds = 20, 3
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("torch", "torchao"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - started
    sys.stdout.write(render(result) + f"\n{result['seconds']:.0f} s in all\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
