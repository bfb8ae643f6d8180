"""``quantizeEmbeddings``: the input embedding and ``lm_head`` in int8, on the tiny model.

The tiny preset has an untied ``lm_head``; a tied copy of it (``tie_word_embeddings``, as
SmolLM2 has) is built here so both shapes are covered. Saved outputs are reloaded in a fresh
interpreter through ``models.load_causal_lm`` - the server's loader - so the operator
registrations it needs are proven to be made by the loader itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kubeforge_runtime import models
from kubeforge_runtime.quantize import embeddings, metrics
from kubeforge_runtime.quantize.methods import get_method

GROUP_SIZE = 64


@pytest.fixture(scope="module")
def tied_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = tmp_path_factory.mktemp("tied") / "model"
    model.save_pretrained(str(out))
    models.load_tokenizer(str(tiny_model)).save_pretrained(str(out))
    return out


def _kinds(model: Any) -> tuple[str, str]:
    return type(model.get_input_embeddings().weight).__name__, type(model.get_output_embeddings().weight).__name__


@pytest.mark.parametrize("name", ["int8-dynamic", "int8-weight-only", "int4-weight-only"])
def test_embeddings_are_int8_when_the_option_is_on_and_not_when_off(name: str, tiny_model: Path) -> None:
    on = get_method(name).load_quantized(tiny_model, "cpu", GROUP_SIZE, embeddings=True)
    off = get_method(name).load_quantized(tiny_model, "cpu", GROUP_SIZE, embeddings=False)
    assert _kinds(on) == ("Int8Tensor", "Int8Tensor")
    assert on.get_input_embeddings().weight.qdata.dtype == torch.int8
    assert _kinds(off) == ("Parameter", "Parameter")
    assert metrics.state_dict_bytes(on) < metrics.state_dict_bytes(off)


def test_a_lookup_reads_only_the_rows_it_needs_and_equals_the_dequantized_table(tiny_model: Path) -> None:
    model = get_method("int8-weight-only").load_quantized(tiny_model, "cpu", GROUP_SIZE)
    table = model.get_input_embeddings().weight
    ids = torch.tensor([[3, 7, 7, 400]])
    with torch.no_grad():
        got = model.get_input_embeddings()(ids)
    assert torch.allclose(got, table.dequantize()[ids], atol=1e-6)


def test_a_tied_lm_head_stays_tied_is_stored_once_and_reloads_in_the_server_loader(
    tied_model: Path, tmp_path: Path
) -> None:
    method = get_method("int8-weight-only")
    model = method.load_quantized(tied_model, "cpu", GROUP_SIZE)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"
    facts = method.save(model, tmp_path)
    assert facts["embeddings"] == "int8-weight-only"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert not [k for k in keys if k.startswith("lm_head.")], keys
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["include_input_output_embeddings"]

    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save((ids, model(ids).logits), tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from kubeforge_runtime import models\n"
        "m = models.load_causal_lm(sys.argv[1]).eval()\n"
        "ids, expected = torch.load(sys.argv[2])\n"
        "assert m.lm_head.weight is m.model.embed_tokens.weight, 'not tied after reload'\n"
        "assert type(m.lm_head.weight).__name__ == 'Int8Tensor', type(m.lm_head.weight)\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(m(ids).logits, expected)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "expected.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]



def test_the_table_has_one_scale_per_group_of_32_values_of_a_row(tiny_model: Path) -> None:
    model = get_method("int8-weight-only").load_quantized(tiny_model, "cpu", GROUP_SIZE)
    table = model.get_input_embeddings().weight
    rows, cols = table.qdata.shape
    assert list(table.block_size) == [1, embeddings.GROUP_SIZE] and cols % embeddings.GROUP_SIZE == 0
    assert table.scale.numel() == rows * cols // embeddings.GROUP_SIZE


def _quantized_table(weight: torch.Tensor, config: Any) -> torch.nn.Embedding:
    from torchao.quantization import quantize_

    embeddings.register_ops()
    table = torch.nn.Embedding(*weight.shape)
    table.weight.data.copy_(weight)
    quantize_(table, config, filter_fn=lambda module, _name: isinstance(module, torch.nn.Embedding))
    return table


def test_groups_keep_a_few_large_columns_from_coarsening_every_row() -> None:
    # The shape of a real tied embedding: most values small, a few hidden dimensions large.
    weight = torch.randn(256, 576, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[:, [31, 100, 247]] *= 20
    small = [c for c in range(576) if c not in (31, 100, 247)]
    grouped = _quantized_table(weight, embeddings.embedding_config(576))
    from torchao.quantization import Int8WeightOnlyConfig

    per_row = _quantized_table(weight, Int8WeightOnlyConfig())
    error = {name: (t.weight.dequantize() - weight)[:, small].norm() / weight[:, small].norm()
             for name, t in (("grouped", grouped), ("row", per_row))}
    assert error["grouped"] < error["row"] / 3, error


def test_a_width_32_does_not_divide_gets_one_scale_per_row_and_both_look_up_only_their_rows() -> None:
    from torchao.quantization import PerRow

    assert isinstance(embeddings.embedding_config(100).granularity, PerRow)
    ids = torch.tensor([[0, 5, 5, 99]])
    for width in (100, 64):  # one scale per row (also how outputs saved before groups load), groups of 32
        weight = torch.randn(100, width, generator=torch.Generator().manual_seed(width))
        table = _quantized_table(weight, embeddings.embedding_config(width))
        with torch.no_grad():
            assert torch.allclose(table(ids), table.weight.dequantize()[ids], atol=1e-6)
