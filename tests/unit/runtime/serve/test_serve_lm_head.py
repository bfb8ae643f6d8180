"""``serve/lm_head.py``: one-row calls project with a ``[hidden, vocab]`` weight copy, calls of
a few rows one vocabulary slice at a time, and both give the logits ``nn.Linear`` gives; larger
calls, other heads and quantized weights are left to ``nn.Linear``.

End to end, one request at a time through the continuous engine (every decode step one row)
equals ``generate()`` in ``test_serve_batching.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubeforge_runtime.serve import lm_head


def _model(tiny_model: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()


def test_one_row_uses_the_copy_and_gives_the_same_logits(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tiny_model)
    head = model.get_output_embeddings()
    weight = head.weight.detach().clone()
    keys = set(model.state_dict())
    assert lm_head.install(model)
    assert not lm_head.install(model)  # once
    assert set(model.state_dict()) == keys  # the copy is not a parameter or buffer
    calls: list[torch.Size] = []
    matmul = torch.matmul

    def counting(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(b.shape)
        return matmul(a, b)

    gen = torch.Generator().manual_seed(0)
    one = torch.randn(1, 1, weight.shape[1], generator=gen)
    many = torch.randn(1, 5, weight.shape[1], generator=gen)
    chunked: list[int] = []
    slices = lm_head._chunked

    def counting_slices(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        chunked.append(x.shape[0])
        return slices(x, w)

    monkeypatch.setattr(lm_head, "_chunked", counting_slices)
    monkeypatch.setattr(lm_head, "CHUNK", 7)  # several slices, the last one short
    assert weight.shape[0] % 7
    torch.matmul = counting
    try:
        with torch.inference_mode():
            got_one, got_many = head(one), head(many)
            monkeypatch.setattr(lm_head, "CHUNKED_MAX_ROWS", 4)
            got_more = head(many)  # 5 rows: nn.Linear's own
    finally:
        torch.matmul = matmul
    assert calls == [torch.Size([weight.shape[1], weight.shape[0]])]  # the one-row call only, on [hidden, vocab]
    assert chunked == [5]  # the 5-row call, once; not the one over CHUNKED_MAX_ROWS
    torch.testing.assert_close(got_one, one @ weight.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_many, many @ weight.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_more, many @ weight.T, rtol=1e-5, atol=1e-5)
    assert got_many.shape == (1, 5, weight.shape[0])
    monkeypatch.undo()
    # greedy decoding through the model's forward is unchanged, one row (batch 1) and three
    reference = _model(tiny_model)
    for batch in (1, 3):
        ids = torch.randint(3, 200, (batch, 9), generator=gen)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
            expected = reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out, expected)


def test_other_heads_are_left_alone(tiny_model: Path) -> None:
    model = _model(tiny_model)
    head = model.get_output_embeddings()

    class Quantized(torch.Tensor):  # stands for a tensor-subclass weight (torchao)
        pass

    head.weight = torch.nn.Parameter(head.weight.detach().as_subclass(Quantized), requires_grad=False)
    assert not lm_head.install(model)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert not lm_head.install(model)


def test_the_benchmark_runs_and_checks_its_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    """``benchmarks/bench_lm_head.py`` on a small shape: every variant timed and compared."""
    import importlib.util

    path = Path(__file__).resolve().parents[4] / "benchmarks" / "bench_lm_head.py"
    spec = importlib.util.spec_from_file_location("bench_lm_head", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--threads", "1", "--rows", "1,3", "--rounds", "1", "--calls", "1", "--hidden", "16",
                           "--vocab", "1000", "--chunks", "64"]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets the process's threads
    out = capsys.readouterr().out
    assert "slices of 64" in out and out.count("nn.Linear") == 2
