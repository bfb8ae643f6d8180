"""Batching correctness: greedy outputs under concurrent load equal the same requests one at a time.

Checked for both engines, and anchored to plain ``generate()`` so "equal to itself" cannot
hide a shared bug.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from support.serving import make_config
from kubeforge_runtime.serve.server import ServerThread

PROMPTS = [
    "The quick brown fox",
    "Question: What is the capital of France? Answer:",
    "def add(a, b):",
    "Kubernetes schedules pods",
    "hello",
    "Quantization stores weights in fewer bits so",
    "0 1 2 3",
    "This movie was wonderful",
]
MAX_TOKENS = 16


def _greedy(client: openai.OpenAI, prompt: str, model: str = "demo") -> tuple[str, str]:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    return out.choices[0].text, out.choices[0].finish_reason


def _check_concurrent_equals_sequential(server: ServerThread) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    sequential = [_greedy(client, p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        # Every prompt twice, all at once: the engine batches them together.
        concurrent = list(pool.map(lambda p: _greedy(client, p), PROMPTS * 2))
    assert concurrent[: len(PROMPTS)] == sequential
    assert concurrent[len(PROMPTS) :] == sequential


def _reference_generate(model_dir: Path) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    texts = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


def test_continuous_engine_concurrent_equals_sequential_and_generate(server: ServerThread, tiny_model: Path) -> None:
    assert server.runtime.backend == "continuous"
    _check_concurrent_equals_sequential(server)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    assert [_greedy(client, p)[0] for p in PROMPTS] == _reference_generate(tiny_model)


@pytest.fixture(scope="module")
def dynamic_server(start_server: Callable[..., ServerThread], tiny_model: Path) -> ServerThread:
    return start_server(make_config(tiny_model, batching="dynamic", maxConcurrentRequests=8))


def test_dynamic_engine_concurrent_equals_sequential(dynamic_server: ServerThread, tiny_model: Path) -> None:
    assert dynamic_server.runtime.backend == "dynamic"
    _check_concurrent_equals_sequential(dynamic_server)
    client = openai.OpenAI(base_url=dynamic_server.base_url + "/v1", api_key="x", max_retries=0)
    assert [_greedy(client, p)[0] for p in PROMPTS] == _reference_generate(tiny_model)


def test_seeded_sampling_is_reproducible_on_dynamic_engine(dynamic_server: ServerThread) -> None:
    client = openai.OpenAI(base_url=dynamic_server.base_url + "/v1", api_key="x", max_retries=0)
    a = client.completions.create(model="demo", prompt="hello", max_tokens=12, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    b = client.completions.create(model="demo", prompt="hello", max_tokens=12, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert a.choices[0].text == b.choices[0].text


def test_sampling_runs_on_continuous_engine(client: openai.OpenAI) -> None:
    out = client.completions.create(model="demo", prompt="hello", max_tokens=12, temperature=0.9, top_p=0.9, extra_body={"ignore_eos": True, "top_k": 20})
    assert out.usage.completion_tokens == 12
