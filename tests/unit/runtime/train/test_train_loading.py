"""Sharded loading (``train/loading.py``) on a base that looks like a large model's: bf16
weights in several safetensors files, tied embeddings, trained with LoRA under bf16.

Each layout is a real torchrun launch; rank 0 dumps the weights every rank read
(``initial_params``, gathered whole) and the tests compare them with what one process gets
from plain ``from_pretrained`` - exactly, since loading only copies. The frozen base must
stay bf16 (the policy in ``loading.param_dtype``) and the adapters fp32; the adapters'
initial values are the same in every layout. The fp32 layouts of
``test_train_distributed.py`` check the same on the untied fp32 tiny model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
from train_support import LORA_ALL, Run, merge, rel

pytestmark = pytest.mark.torchrun

LAYOUTS: dict[str, tuple[int, dict[str, Any]]] = {
    "one": (0, {}),
    "dp2-fsdp": (2, {"parallelism": {"strategy": "fsdp"}}),
    "tp2xdp2": (4, {"parallelism": {"tensor": 2}}),
    # Merged output: test_output_written_shard_by_shard_loads_with_from_pretrained reads this
    # launch's output (one 4-process launch for both; the output format is written after the
    # last step, so the loaded weights and the losses the loading test compares are the same).
    "pp2xdp2": (4, {"parallelism": {"pipeline": 2, "pipelineSchedule": "1F1B"}, "output": {"format": "merged"}}),
}


@pytest.fixture(scope="module")
def bf16_tied_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model with tied embeddings, saved in bf16 over several safetensors files."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16-tied") / "model"
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    lm.config.tie_word_embeddings = True
    lm.tie_weights()
    lm.to(torch.bfloat16).save_pretrained(str(out), max_shard_size="100KB")
    for f in tiny_model.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, out / f.name)
    assert len(list(out.glob("*.safetensors"))) > 2 and (out / "model.safetensors.index.json").exists()
    return out


def _launch(name: str, launcher: Callable[..., Run], model: Path) -> Run:
    nproc, overrides = LAYOUTS[name]
    lora = {"model": {"uri": f"file://{model}"}, "method": "lora",
            "lora": {"r": 4, "alpha": 8, "targetModules": LORA_ALL}, "output": {"format": "adapter"},
            "training": {"precision": "bf16", "maxGradNorm": 0}}
    return launcher(f"bf16-tied-lora-{name}", merge(lora, overrides), nproc)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bf16_tied_base_loads_as_one_process(name: str, launcher: Callable[..., Run], bf16_tied_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kubeforge_runtime.train.loading import file_key, is_adapter

    got = _launch(name, launcher, bf16_tied_model).dump()
    whole = AutoModelForCausalLM.from_pretrained(str(bf16_tied_model)).state_dict()
    assert whole["lm_head.weight"].dtype == torch.bfloat16
    init = got["initial_params"]
    frozen = {file_key(k): v for k, v in init.items() if not is_adapter(k)}
    # Every parameter of the model; the tied head is the embedding, except on a last pipeline
    # stage without the embedding, which reads its head from the embedding's key.
    assert set(whole) - {"lm_head.weight"} <= set(frozen) <= set(whole)
    assert ("lm_head.weight" in frozen) == (name == "pp2xdp2")
    for key, value in frozen.items():
        assert value.dtype == torch.bfloat16, f"{key} is {value.dtype}: the frozen base must stay bf16"
        assert torch.equal(value, whole[key]), key
    adapters = {k: v for k, v in init.items() if is_adapter(k)}
    assert adapters and all(v.dtype == torch.float32 for v in adapters.values())
    one = _launch("one", launcher, bf16_tied_model).dump()["initial_params"]
    for key, value in adapters.items():
        assert torch.equal(value, one[key]), key
    assert any(v.abs().max() > 0 for k, v in adapters.items() if ".lora_A." in k)
    # It trains, and as one process does (bf16 autocast: split sums round differently).
    ref = _launch("one", launcher, bf16_tied_model).dump()
    assert got["losses"][-1] < got["losses"][0]
    assert rel(got["losses"], ref["losses"]) < 1e-2


def test_qlora_reads_a_tied_multi_file_base(launcher: Callable[..., Run], bf16_tied_model: Path) -> None:
    """QLoRA's tensor-by-tensor load (``loading.materialize_qlora``) on a base with tied
    embeddings (as SmolLM2 has): the embedding is read once under its own key, the head is
    the embedding, every decoder linear and the embedding are NF4 of the stored weight, and
    it trains."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubeforge_runtime.train import qlora
    from kubeforge_runtime.train.loading import file_key, is_adapter

    run = launcher("bf16-tied-qlora", {"model": {"uri": f"file://{bf16_tied_model}"}, "method": "qlora",
                                       "lora": {"r": 4, "alpha": 8, "targetModules": LORA_ALL},
                                       "output": {"format": "adapter"}})
    assert "for QLoRA tensor by tensor" in run.log()
    got = run.dump()
    whole = AutoModelForCausalLM.from_pretrained(str(bf16_tied_model), dtype=torch.float32).state_dict()
    frozen = {file_key(k): v for k, v in got["initial_params"].items() if not is_adapter(k)}
    assert "model.embed_tokens.weight" in frozen and set(frozen) <= set(whole)
    quantized = 0
    for key, value in frozen.items():
        expected = whole[key]
        if (".layers." in key and expected.dim() == 2) or key == "model.embed_tokens.weight":
            expected = qlora.to_nf4(expected).get_original_weight()
            quantized += 1
        assert torch.equal(value, expected.to(value.dtype)), key
    assert quantized == 4 * 7 + 1  # the tied head is the embedding: quantized once
    assert got["losses"][-1] < got["losses"][0]


def test_output_written_shard_by_shard_loads_with_from_pretrained(launcher: Callable[..., Run],
                                                                  bf16_tied_model: Path) -> None:
    """PP2 x DP2, LoRA merged output: every rank wrote its part (shard_output.py); plain
    ``from_pretrained`` reads the consolidated files and gives the logits of the model
    rebuilt in one process from the same checkpoint (the one-process output path)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubeforge_runtime.train import checkpoint as ckpt
    from kubeforge_runtime.train import output
    from kubeforge_runtime.train.config import parse_config

    run = _launch("pp2xdp2", launcher, bf16_tied_model)
    assert run.config["output"]["format"] == "merged"
    assert "output written from one process" not in run.log()
    index = run.out / "model.safetensors.index.json"
    assert index.exists() and not (run.out / "sharded").exists()
    got = AutoModelForCausalLM.from_pretrained(str(run.out))
    assert got.config.tie_word_embeddings and got.lm_head.weight is got.model.embed_tokens.weight
    cfg = parse_config(run.config)
    one = output.output_model(ckpt.load_single_process(ckpt.latest(run.out / "checkpoints"), cfg), cfg)
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        want = one(ids, use_cache=False).logits
        have = got(ids, use_cache=False).logits
    assert rel(have, want) < 1e-5
    # The adapters trained: the merged weights are not the base's.
    base = AutoModelForCausalLM.from_pretrained(str(bf16_tied_model), dtype=torch.float32)
    with torch.no_grad():
        assert rel(base(ids, use_cache=False).logits, have) > 1e-4
