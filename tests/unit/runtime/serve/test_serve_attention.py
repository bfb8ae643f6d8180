"""Per-request paged attention (``serve/attention.py``) computes what the masked ``sdpa`` path does.

* Against an independently built reference: ``sdpa`` over the whole batch under a
  block-diagonal, bottom-right-causal mask (what transformers' paged ``sdpa`` path computes),
  on decode-only, prefill-only and mixed batches with cached prefixes and grouped key heads.
  The reference is checked to differ from attention that leaks across requests, so the
  comparison can fail.
* End to end in the continuous engine (decoding-only steps reading their keys straight from
  the paged cache, the other steps through the concatenated keys) on the tiny model: greedy tokens of concurrent prompts
  of different lengths - staggered so steps mix prefill and decode, with chunked prefills (a
  small batch-token budget) and a prefix-cache hit - are the same with the per-request
  attention as with transformers' masked ``sdpa`` path.
"""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kubeforge_runtime.serve import attention
from kubeforge_runtime.serve.config import EngineConfig
from kubeforge_runtime.serve.continuous import ContinuousEngine
from kubeforge_runtime.serve.engine import EngineRequest

HEADS, KV_HEADS, DIM = 6, 2, 16


def _batch(q_lens: list[int], k_lens: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(q_lens), sum(k_lens)
    # Laid out as the model lays them out: [1, tokens, heads, dim] transposed to [1, heads, tokens, dim].
    q = torch.randn(1, tq, HEADS, DIM, generator=g).transpose(1, 2)
    k = torch.randn(1, tk, KV_HEADS, DIM, generator=g).transpose(1, 2)
    v = torch.randn(1, tk, KV_HEADS, DIM, generator=g).transpose(1, 2)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(q_lens), cu(k_lens)


def _reference(q, k, v, q_lens, k_lens, leak: bool = False) -> torch.Tensor:
    """Masked sdpa over the whole batch; ``leak`` lets every query see every key (the bug to catch)."""
    mask = torch.zeros(sum(q_lens), sum(k_lens), dtype=torch.bool)
    qs = ks = 0
    for ql, kl in zip(q_lens, k_lens):
        for i in range(ql):  # query i of a request sees its keys 0 .. kl - ql + i
            mask[qs + i, ks : ks + kl - ql + i + 1] = True
        qs, ks = qs + ql, ks + kl
    if leak:
        mask[:] = True
    group = HEADS // KV_HEADS
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=DIM**-0.5
    )
    return out.transpose(1, 2)  # [1, q_tokens, heads, dim]


class _Layer(torch.nn.Module):
    num_key_value_groups = HEADS // KV_HEADS


CASES = {
    "decode only": ([1, 1, 1, 1], [5, 17, 1, 9]),
    "prefill only": ([7, 3, 12], [7, 3, 12]),
    "mixed, cached prefixes": ([1, 6, 1, 4, 1], [20, 6, 3, 11, 8]),  # 4 of 11: a chunk after 7 cached keys
    "one request": ([9], [9]),
    "one decoding request (no padding, no mask)": ([1], [13]),
    "decode only, equal lengths (no mask)": ([1, 1, 1], [8, 8, 8]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_request_attends_to_its_own_keys(case: str) -> None:
    q_lens, k_lens = CASES[case]
    q, k, v, cu_q, cu_k = _batch(q_lens, k_lens)
    out, weights = attention.paged_attention(
        _Layer(), q, k, v, None, scaling=DIM**-0.5, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, is_causal=True
    )
    assert weights is None
    expected = _reference(q, k, v, q_lens, k_lens)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if len(q_lens) > 1:  # the comparison would catch keys leaking between requests
        assert not torch.allclose(out, _reference(q, k, v, q_lens, k_lens, leak=True), atol=1e-3)


def test_padding_mask_only_where_a_request_is_padded() -> None:
    valid, index = attention._right_padded([0, 8], [8, 8])
    assert valid is None and index.tolist() == list(range(16))
    valid, index = attention._right_padded([0, 8], [8, 3])
    assert valid is not None and valid.view(2, -1).sum(1).tolist() == [8, 3]
    assert index.tolist() == list(range(8)) + [8, 9, 10, 10, 10, 10, 10, 10]


def test_outside_a_continuous_batch_it_refuses() -> None:
    q, k, v, _, _ = _batch([3], [3])
    with pytest.raises(ValueError, match="continuous-batching"):
        attention.paged_attention(_Layer(), q, k, v, None)


def _generate(model_dir: Path, per_request: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, list[int]], str]:
    """Greedy tokens of staggered concurrent requests through the continuous engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa").eval()
    padded_steps = []  # layers that ran on keys read straight from the cache (decoding-only steps)
    if per_request:
        decode_padded = attention._decode_padded
        monkeypatch.setattr(attention, "_decode_padded", lambda *a: padded_steps.append(1) or decode_padded(*a))
    with monkeypatch.context() as patch:
        if not per_request:
            patch.setattr(attention, "install", lambda manager: False)
        # 24 batch tokens: the longer prompts are prefilled in chunks that read their cached start.
        cfg = EngineConfig.model_validate({"maxConcurrentRequests": 8, "maxBatchTokens": 24, "kvBlockSize": 4})
        engine = ContinuousEngine(model, tok, cfg, 128)
    assert engine.per_request_attention is per_request
    engine.start()
    running_impl = model.config._attn_implementation
    rng = random.Random(3)
    shared = [rng.randrange(3, 500) for _ in range(16)]
    prompts = {f"p{i}": [rng.randrange(3, 500) for _ in range(n)] for i, n in enumerate([5, 40, 2, 17, 29, 9])}
    prompts["shared-a"] = shared + [7, 8, 9]
    late = {"shared-b": shared + [10, 11], "late": [rng.randrange(3, 500) for _ in range(13)]}
    outputs: dict[str, list[int]] = {}
    finished: dict[str, threading.Event] = {}

    def submit(rid: str, ids: list[int]) -> None:
        finished[rid] = threading.Event()

        def sink(ev) -> None:
            assert ev.error is None, ev.error
            if ev.finished:
                outputs[rid] = ev.token_ids
                finished[rid].set()

        engine.submit(EngineRequest(rid, ids, 10, [], temperature=0.0), sink)

    async def run() -> None:
        for rid, ids in prompts.items():
            submit(rid, ids)
            await asyncio.sleep(0.01)  # staggered: later prompts join a batch that is decoding
        while not finished["shared-a"].is_set():  # its prefix blocks are cached once it ends
            await asyncio.sleep(0.01)
        for rid, ids in late.items():
            submit(rid, ids)
        while not all(e.is_set() for e in finished.values()):
            await asyncio.sleep(0.01)

    try:
        asyncio.run(asyncio.wait_for(run(), 300))
        hits = engine.prefix_cache_stats()[1]
    finally:
        engine.stop()
        monkeypatch.undo()
    assert bool(padded_steps) is per_request
    assert model.config._attn_implementation == "sdpa"  # the manager's stop() switched it back
    assert hits > 0  # shared-b found shared-a's blocks: a prefill after cached keys
    return outputs, running_impl


def test_engine_greedy_tokens_equal_the_masked_sdpa_path(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    per_request, impl = _generate(tiny_model, True, monkeypatch)
    masked, masked_impl = _generate(tiny_model, False, monkeypatch)
    assert impl == attention.NAME and masked_impl == "sdpa"
    assert set(per_request) == set(masked) and all(len(t) == 10 for t in per_request.values())
    assert per_request == masked


def test_lm_head_projects_only_the_positions_that_predict(tiny_model: Path) -> None:
    """``continuous.logits_for_new_tokens_only``: the step asks the model for the rows of
    ``logits_indices`` only (a prefill's last token, each decoding token), and gets the logits
    the full projection gives on those rows."""
    from transformers import AutoModelForCausalLM

    from kubeforge_runtime.serve import continuous

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([4, 9, 11])  # ends of a 5-token and a 5-token prefill, one decoding token

    class _IO:
        def get_model_kwargs(self, use_padding: bool = False) -> dict:
            return {"input_ids": ids, "logits_indices": rows}

    class _Processor:
        inputs_and_outputs = _IO()

    assert continuous.logits_for_new_tokens_only(_Processor, model)
    batch = _Processor.inputs_and_outputs.get_model_kwargs(use_padding=False)
    assert batch["logits_to_keep"] is rows
    with torch.inference_mode():
        full = model(input_ids=ids).logits[:, rows]
        kept = model(input_ids=ids, logits_to_keep=batch["logits_to_keep"]).logits
    assert kept.shape == (1, 3, model.config.vocab_size)
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5)
