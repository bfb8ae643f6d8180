"""Prefix caching and multi-LoRA on one base, over real HTTP with the official openai client.

* Two chats sharing a long system prompt: the second one's prompt is found in the prefix
  cache and ``vllm:prefix_cache_hits_total`` counts it; the greedy answer is the same as
  without the cache; ``vllm:kv_cache_usage_perc`` is back to 0 once idle although the cached
  blocks are still there (the manager's own free-capacity figure still counts them).
* Two adapters on one base: the process holds the base weights once; the second adapter adds
  its LoRA matrices and nothing else (summed distinct tensor storage of every served model,
  counted here independently of the server's own figure); each adapter's greedy output equals
  the merged model's, on the continuous and the dynamic engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from support.serving import make_config, metric_value
from kubeforge_runtime.serve.server import ServerThread

SYSTEM = (
    "You are the support assistant of a Kubernetes platform team. Answer questions about pods, jobs, "
    "services, deployments and autoscaling in short sentences, name the kubectl command to run, and never "
    "invent resource names the user did not give you. "
) * 2


def _chat(client: openai.OpenAI, model: str, question: str) -> str:
    out = client.chat.completions.create(
        model=model, temperature=0, max_tokens=8, extra_body={"ignore_eos": True},
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
    )
    return out.choices[0].message.content or ""


def _metrics(server: ServerThread) -> str:
    return httpx.get(server.base_url + "/metrics", timeout=30).text


def _client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _idle_kv_usage(server: ServerThread, timeout: float = 10.0) -> float:
    """vllm:kv_cache_usage_perc once the engine has freed the finished requests' blocks."""
    deadline = time.monotonic() + timeout
    while True:
        usage = metric_value(_metrics(server), "vllm:kv_cache_usage_perc")
        if usage == 0.0 or time.monotonic() > deadline:
            return usage
        time.sleep(0.1)


def test_shared_system_prompt_hits_the_prefix_cache(start_server: Callable[..., ServerThread], tiny_model: Path) -> None:
    server = start_server(make_config(tiny_model, name="prefixed", batching="continuous"))
    client = _client(server)
    prompt_tokens = len(server.runtime.encode_chat([{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": "How do I list pods?"}]))
    assert prompt_tokens > 4 * 16  # several whole 16-token blocks of shared prefix

    first = _chat(client, "prefixed", "How do I list pods?")
    text = _metrics(server)
    assert metric_value(text, "vllm:prefix_cache_queries_total", model_name="prefixed") == prompt_tokens
    assert metric_value(text, "vllm:prefix_cache_hits_total", model_name="prefixed") == 0  # nothing cached yet

    again = _chat(client, "prefixed", "How do I list pods?")
    other = _chat(client, "prefixed", "Why is my job pending?")
    text = _metrics(server)
    hits = metric_value(text, "vllm:prefix_cache_hits_total", model_name="prefixed")
    queries = metric_value(text, "vllm:prefix_cache_queries_total", model_name="prefixed")
    # The repeat finds all its whole blocks but the one holding the last prompt token; the
    # other question finds at least the blocks of the system prompt.
    assert hits >= (prompt_tokens - 1) // 16 * 16 + 4 * 16
    assert queries > prompt_tokens * 2
    assert again == first  # reused KV gives the same greedy answer
    assert other

    # Idle: no request holds a block, though the shared prefix stays cached for the next one.
    assert _idle_kv_usage(server) == 0.0
    cache = server.runtime.models["prefixed"].engine._manager.batch_processor.cache  # type: ignore[attr-defined]
    assert sum(len(a.ledger.cached_blocks) for a in cache.cache_allocators.values()) > 0
    assert 1.0 - cache.compute_free_capacity(relative=True) > 0  # what the metric used to report


def test_prefix_caching_can_be_switched_off(start_server: Callable[..., ServerThread], tiny_model: Path) -> None:
    server = start_server(make_config(tiny_model, name="uncached", batching="continuous", prefixCaching=False))
    client = _client(server)
    assert _chat(client, "uncached", "How do I list pods?") == _chat(client, "uncached", "How do I list pods?")
    text = _metrics(server)
    assert metric_value(text, "vllm:prefix_cache_hits_total", model_name="uncached") == 0
    assert metric_value(text, "vllm:prefix_cache_queries_total", model_name="uncached") == 0
    assert server.runtime.models["uncached"].engine.kv_cache_info()["prefixCaching"] is False
    assert _idle_kv_usage(server) == 0.0


# -- multi-LoRA on one base -------------------------------------------------------------------

@pytest.fixture(scope="module")
def second_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another LoRA adapter on other layers and with another rank than ``tiny_adapter``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-adapter-b")
    torch.manual_seed(2)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_model)),
        LoraConfig(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(str(out))
    return out


def _adapter_file_bytes(path: Path) -> int:
    """Bytes of the LoRA matrices the adapter directory holds."""
    from safetensors.torch import load_file

    return sum(t.nbytes for t in load_file(str(path / "adapter_model.safetensors")).values())


def _distinct_storage_bytes(models: list[Any]) -> int:
    seen: dict[int, int] = {}
    for model in models:
        for t in [*model.parameters(), *model.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _merged_greedy(tiny_model: Path, adapter: Path, prompt: str, n: int) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(adapter)).merge_and_unload()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = merged.eval().generate(input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                     pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("batching", ["continuous", "dynamic"])
def test_two_adapters_share_one_base(start_server: Callable[..., ServerThread], tiny_model: Path, tiny_adapter: Path,
                                     second_adapter: Path, batching: str) -> None:
    name = f"lora-{batching}"
    adapters = [{"name": f"{name}-a", "uri": f"file://{tiny_adapter}"}, {"name": f"{name}-b", "uri": f"file://{second_adapter}"}]
    server = start_server(make_config(tiny_model, name=name, batching=batching, adapters=adapters))
    assert server.runtime.backend == batching

    # Memory, from the process: the distinct tensor storage behind every served model.
    modules = {n: m.engine._model for n, m in server.runtime.models.items()}  # type: ignore[attr-defined]
    base = _distinct_storage_bytes([modules[name]])
    with_a = _distinct_storage_bytes([modules[name], modules[f"{name}-a"]])
    with_both = _distinct_storage_bytes(list(modules.values()))
    size_a, size_b = _adapter_file_bytes(tiny_adapter), _adapter_file_bytes(second_adapter)
    assert with_a - base == size_a  # the first adapter adds its LoRA matrices, not a base copy
    assert with_both - with_a == size_b  # and so does the second
    assert size_b < 0.2 * base
    # ... and the server reports the same figures.
    ready = httpx.get(server.base_url + "/ready", timeout=30).json()
    assert ready["weightBytes"] == {name: base, f"{name}-a": size_a, f"{name}-b": size_b}

    # Each adapter answers as its merged model would, token for token.
    client = _client(server)
    prompt, n = "The quick brown fox", 12
    texts = {}
    for model, path in [(f"{name}-a", tiny_adapter), (f"{name}-b", second_adapter)]:
        texts[model] = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                                 extra_body={"ignore_eos": True}).choices[0].text
        assert texts[model] == _merged_greedy(tiny_model, path, prompt, n)
    base_text = client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
    assert len({base_text, *texts.values()}) == 3  # three different models behind one set of base weights
