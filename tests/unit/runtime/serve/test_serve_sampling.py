"""The continuous engine's row-wise top-k/top-p and draw (``serve/sampling.py``) against transformers' own.

The warpers must filter exactly as transformers' continuous-batching warpers do, row by row,
for any mix of greedy (``top_k=1``), top-k, top-p and unfiltered rows; the draw must take the
argmax of single-candidate rows and follow the row's distribution otherwise.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from kubeforge_runtime.serve import sampling


def _processors() -> ContinuousBatchingLogitsProcessorList:
    # What the engine's GenerationConfig creates: all three per-request warpers.
    warpers = [TemperatureLogitsWarper(0.5), TopKLogitsWarper(1 << 30), TopPLogitsWarper(0.5)]
    return ContinuousBatchingLogitsProcessorList(LogitsProcessorList(warpers), per_request_processors=True)


class _Manager:
    def __init__(self) -> None:
        self.logit_processor = _processors()


def test_rowwise_warpers_filter_exactly_as_transformers() -> None:
    rows, vocab = 12, 3000
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(rows, vocab, generator=gen) * 4
    scores[3, :5] = scores[3].max() + 1  # a tie at the top of a greedy row
    temperature = torch.ones(rows)
    temperature[4], temperature[5] = 0.7, 1.6
    top_k = torch.full((rows,), 1 << 30, dtype=torch.int32)
    top_k[:4] = 1  # greedy
    top_k[4], top_k[6], top_k[7] = 40, 3, vocab  # k == vocab filters nothing
    top_p = torch.ones(rows)
    top_p[5], top_p[6], top_p[8] = 0.9, 0.5, 0.05
    args = torch.zeros(3, 32, dtype=torch.int32)
    args[0, :rows] = temperature.view(torch.int32)
    args[1, :rows] = top_k
    args[2, :rows] = top_p.view(torch.int32)

    manager = _Manager()
    assert sampling.install(manager) == 2
    ids = torch.zeros(rows, dtype=torch.long)
    expected = _processors()(ids, scores.clone(), args)
    got = manager.logit_processor(ids, scores.clone(), args)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got[~torch.isinf(got)], expected[~torch.isinf(expected)])
    assert int((~torch.isinf(got[3])).sum()) == 5  # the tie survives, as in transformers
    assert int((~torch.isinf(got[0])).sum()) == 1


def test_single_candidate_rows_take_the_argmax() -> None:
    probs = torch.zeros(4, 50)
    probs[torch.arange(4), torch.tensor([7, 0, 49, 13])] = 1.0
    assert sampling.sample_rows(probs).tolist() == [7, 0, 49, 13]


def test_sampled_rows_follow_their_distribution() -> None:
    torch.manual_seed(0)
    target = torch.tensor([0.2, 0.0, 0.3, 0.5])
    probs = target.repeat(20000, 1)
    counts = torch.bincount(sampling.sample_rows(probs), minlength=4).float() / 20000
    assert counts[1] == 0
    assert torch.allclose(counts, target, atol=0.02), counts


def test_sampler_replaces_only_a_sampling_runner_without_logprobs() -> None:
    class Runner:
        def __init__(self, do_sample: bool, return_logprobs: bool) -> None:
            self.do_sample, self.return_logprobs = do_sample, return_logprobs

    assert not sampling.install_sampler(Runner(False, False))
    assert not sampling.install_sampler(Runner(True, True))
    runner = Runner(True, False)
    assert sampling.install_sampler(runner)
    out = torch.zeros(2, 4, dtype=torch.int32)
    scores = torch.full((1, 2, 10), float("-inf"))
    scores[0, 0, 3] = scores[0, 1, 8] = 1.0
    runner._sample(scores, out)
    assert out[0, :2].tolist() == [3, 8]


class _ProcessingRunner:
    do_sample, return_logprobs = True, False

    def __init__(self) -> None:
        self.logit_processor = _processors()


def _args(top_k: list[int], temperature: float = 1.0) -> torch.Tensor:
    rows = len(top_k)
    args = torch.zeros(3, 8, dtype=torch.int32)
    args[0, :rows] = torch.full((rows,), temperature).view(torch.int32)
    args[1, :rows] = torch.tensor(top_k, dtype=torch.int32)
    args[2, :rows] = torch.ones(rows).view(torch.int32)
    return args


def test_greedy_steps_skip_the_processors_and_take_the_raw_argmax() -> None:
    runner = _ProcessingRunner()
    assert sampling.install_sampler(runner)
    assert isinstance(runner.logit_processor, sampling.GreedySteps)
    assert runner.logit_processor.do_processing  # the list's own attributes still answer
    scores = torch.randn(3, 500, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(3, dtype=torch.long)
    out = runner.logit_processor(ids, scores, _args([1, 1, 1], temperature=0.5))
    assert out is scores  # untouched: no temperature, no filter, no copy
    tokens = torch.zeros(2, 8, dtype=torch.int32)
    runner._sample(scores.unsqueeze(0), tokens)
    assert tokens[0, :3].tolist() == scores.argmax(-1).tolist()


def test_a_step_with_one_sampled_row_runs_the_processors() -> None:
    runner = _ProcessingRunner()
    sampling.install_sampler(runner)
    scores = torch.randn(3, 500, generator=torch.Generator().manual_seed(2))
    ids = torch.zeros(3, dtype=torch.long)
    args = _args([1, 1, 1 << 30], temperature=0.5)
    out = runner.logit_processor(ids, scores.clone(), args)
    assert not runner.logit_processor.all_greedy
    assert torch.equal(out, _processors()(ids, scores.clone(), args))  # the full chain, as before
    assert int((~torch.isinf(out[0])).sum()) == 1 and int((~torch.isinf(out[2])).sum()) == 500


def test_greedy_steps_stay_off_beside_another_processor() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    runner = _ProcessingRunner()
    runner.logit_processor.logits_processor.append(RepetitionPenaltyLogitsProcessor(1.3))
    assert sampling.install_sampler(runner)
    assert not isinstance(runner.logit_processor, sampling.GreedySteps)
