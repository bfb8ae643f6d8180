"""Packed samples through each attention path: every record gets the logits it gets alone.

The stage's forward (``parallelize.CausalLMStage``, what every layout runs) is fed one packed
sample of two records; the second record's logits must equal that record's logits alone, for
every attention implementation that runs here (``train/attention.py``), and the paths must
agree with each other. Flex attention runs forward only on CPU (torch has no CPU backward for
it), compiled by transformers: the slowest case here. flash_attention_2 needs CUDA and the
flash_attn package and is skipped without them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubeforge_runtime import data as D
from kubeforge_runtime import models
from kubeforge_runtime.train import attention
from kubeforge_runtime.train.config import ConfigError
from kubeforge_runtime.train.parallelize import CausalLMStage

PATHS = ["sdpa", "eager", "flex_attention", "flash_attention_2"]


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    return models.load_tokenizer(str(tiny_model))


def _packed_pair(tok) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Record b packed after record a, and b first in a sample of the same length (by
    causality its first tokens see only themselves: b alone, with no recompilation for a new
    shape). Returns (x, pos, x_alone, pos_alone, where b starts in x)."""
    a = D.tokenize_record(tok, {"text": "The first record talks about apples."}, "text")
    b = D.tokenize_record(tok, {"text": "A second one, about pears."}, "text")
    s = len(a[0]) + len(b[0]) - 1
    x, _, pos = D.build_samples([a, b, a], s, packing=True, pad_id=0)
    x_alone, _, pos_alone = D.build_samples([b, a], s, packing=True, pad_id=0)
    return x[:1], pos[:1], x_alone[:1], pos_alone[:1], len(a[0])


@pytest.mark.timeout(1500)  # flex attention is compiled on first use: minutes on a loaded 2-core machine
@pytest.mark.parametrize("impl", PATHS)
def test_packed_records_get_their_logits_alone(impl: str, tok, tiny_model: Path) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if impl == "flash_attention_2" and not (device == "cuda" and attention.flash_attn_installed()):
        pytest.skip("flash_attention_2 needs CUDA and the flash_attn package")
    x, pos, x_alone, pos_alone, start = _packed_pair(tok)
    n = x.shape[1] - start
    lm = models.load_causal_lm(tiny_model).eval().to(device)
    attention.apply(lm, attention.resolve(impl, device, training=False))
    assert lm.config._attn_implementation == impl
    stage = CausalLMStage(lm, True, True)
    with torch.no_grad():
        packed = stage(x.to(device), pos.to(device))[0, start:].cpu()
        alone = stage(x_alone.to(device), pos_alone.to(device))[0, :n].cpu()
        attention.apply(lm, "eager")
        unmasked = stage(x.to(device))[0, start:].cpu()  # plain positions: attends to the first record
        reference = stage(x.to(device), pos.to(device))[0, start:].cpu()
    assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()
    assert torch.allclose(packed, reference, atol=1e-5), (packed - reference).abs().max()
    assert not torch.allclose(unmasked, alone, atol=1e-3)


def test_masks_carry_boundaries_not_a_dense_mask_where_the_kernel_can(tiny_model: Path) -> None:
    """sdpa: no mask at all for unpacked rows (the is_causal fast path), record buckets for a
    packed batch, the dense boolean fallback only for compiled blocks; flex: a BlockMask (the
    document rule, block-sparse)."""
    from torch.nn.attention.flex_attention import BlockMask

    lm = models.load_causal_lm(tiny_model)
    h = torch.zeros(2, 16, lm.config.hidden_size)
    plain = torch.arange(16).repeat(2, 1)
    packed = torch.cat([torch.arange(6), torch.arange(10)]).repeat(2, 1)
    attention.apply(lm, "sdpa")
    assert attention.stage_mask(lm.config, h, plain) is None
    docs = attention.stage_mask(lm.config, h, packed)
    assert isinstance(docs, attention.Documents) and docs.records == 4
    assert docs.buckets == [(0, 4, 16)]  # 6 and 10 tokens, each padded to the shortest bucket
    assert docs.gather[:16].tolist() == list(range(6)) + [5] * 10  # pads repeat the record's last token
    assert docs.scatter.tolist()[:8] == [0, 1, 2, 3, 4, 5, 16, 17]
    dense = attention.stage_mask(lm.config, h, packed, documents=False)
    assert dense.shape == (2, 1, 16, 16) and dense.dtype == torch.bool
    assert not dense[0, 0, 6:, :6].any()
    assert torch.equal(dense[0, 0, 6:, 6:], torch.ones(10, 10, dtype=torch.bool).tril())
    attention.apply(lm, "flex_attention")
    block = attention.stage_mask(lm.config, h, packed)
    assert isinstance(block, BlockMask)
    assert tuple(block.shape[-2:]) == (16, 16)
    assert block.mask_mod(torch.tensor(0), torch.tensor(0), torch.tensor(7), torch.tensor(5)).item() is False  # across records
    assert block.mask_mod(torch.tensor(0), torch.tensor(0), torch.tensor(9), torch.tensor(7)).item() is True  # inside one


def test_auto_picks_a_trainable_kernel_and_bad_choices_name_the_field() -> None:
    assert attention.resolve("auto", "cpu") == "sdpa"
    with pytest.raises(ConfigError, match="training.attention flex_attention has no backward on CPU"):
        attention.resolve("flex_attention", "cpu")
    assert attention.resolve("flex_attention", "cpu", training=False) == "flex_attention"
    if not attention.flash_attn_installed():
        with pytest.raises(ConfigError, match="training.attention flash_attention_2 needs CUDA"):
            attention.resolve("flash_attention_2", "cuda")


def test_record_buckets_give_the_dense_masks_loss_and_gradients(tok, tiny_model: Path) -> None:
    """sdpa on a packed micro-batch, record by record (``Documents``: records of several
    bucket lengths, two rows, grouped-query heads) against the dense block-diagonal mask:
    the same loss and every gradient."""
    import torch.nn.functional as F

    records = [D.tokenize_record(tok, {"text": t}, "text") for t in (
        "Short.", "A record of medium length about the weather in spring and autumn.",
        "Another one.", "The longest record here goes on about apples, pears, plums, cherries and "
        "the orchards they grow in, for long enough to need a larger bucket than the others.", "End.")]
    x, y, pos = D.build_samples(records * 3, 64, packing=True, pad_id=0)
    x, y, pos = x[:2], y[:2], pos[:2]
    assert attention.packed(pos)
    lm = models.load_causal_lm(tiny_model).train()
    attention.apply(lm, "sdpa")
    assert lm.config.num_key_value_heads < lm.config.num_attention_heads
    stage = CausalLMStage(lm, True, True)
    docs = attention.Documents(pos)
    # a row that starts inside a record (positions not at 0) starts a record of its own
    assert len(docs.buckets) > 1 and docs.records == int((pos == 0).sum() + (pos[:, 0] != 0).sum())

    def loss_and_grads(documents: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lm.zero_grad(set_to_none=True)
        stage.documents = documents  # False: the dense mask compiled blocks get
        logits = stage(x, pos)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=D.IGNORE_INDEX, reduction="sum")
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}

    loss, grads = loss_and_grads(True)
    ref_loss, ref_grads = loss_and_grads(False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
