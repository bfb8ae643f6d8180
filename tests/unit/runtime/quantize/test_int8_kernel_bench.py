"""benchmarks/bench_int8_kernels.py: every eager int8 kernel path runs the decoder layer's linears
close to fp32, and the table names the CPU's ISA facts read from the real machine."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from kubeforge_runtime.quantize.speed import host_cpu

BENCH = Path(__file__).resolve().parents[4] / "benchmarks" / "bench_int8_kernels.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_int8_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eager_int8_paths_run_close_to_fp32_and_the_table_names_the_cpu() -> None:
    bench = _bench()
    result = bench.run(argparse.Namespace(batches=[1, 2], calls=1, rounds=1, compile=False))
    rows = result["rows"]
    assert set(rows) == {"fp32 eager", "int8-weight-only eager (torchao)", "int8-dynamic eager (torchao)",
                         "int8 _weight_int8pack_mm eager (aten)"}
    for name, row in rows.items():
        for batch in (1, 2):
            assert row[f"b{batch}Us"] > 0, name
            # int8 of a random layer's output: close to fp32, not equal (the paths really quantize)
            if name == "fp32 eager":
                assert row[f"b{batch}MaxAbsErrorVsFp32"] == 0
            else:
                assert 0 < row[f"b{batch}MaxAbsErrorVsFp32"] < 0.5, (name, row)
    table = bench.render(result)
    cpu = host_cpu()
    assert f"torch CPU capability {cpu.capability}" in table
    assert all(flag in table for flag in cpu.int8_dot) if cpu.int8_dot else "none of avx512_vnni" in table
