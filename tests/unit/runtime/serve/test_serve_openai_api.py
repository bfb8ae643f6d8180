"""The OpenAI API over real HTTP with the official ``openai`` client: shapes, streaming, errors."""

from __future__ import annotations

import httpx
import openai
import pytest

from kubeforge_runtime.serve.server import ServerThread


def test_completion_non_streaming_has_text_and_usage(client: openai.OpenAI) -> None:
    out = client.completions.create(model="demo", prompt="The quick brown fox", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == "demo"
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    assert isinstance(out.choices[0].text, str) and out.choices[0].text
    assert out.usage.completion_tokens == 8
    assert out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_completion_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    kwargs = dict(model="demo", prompt="Question: What is", max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_non_streaming_and_streaming(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hello world"}]
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=10, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens >= 1

    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_models_lists_base_and_adapter(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"demo", "support-bot"}
    assert models["support-bot"].model_extra["parent"] == "demo"


def test_n_and_multiple_prompts(client: openai.OpenAI) -> None:
    out = client.completions.create(model="demo", prompt=["hello", "world"], n=2, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: same prompt, same text
    assert out.usage.completion_tokens == 16


def test_stop_sequence_ends_the_text(client: openai.OpenAI) -> None:
    free = client.completions.create(model="demo", prompt="def add(a, b):", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = free.choices[0].text
    stop = text[5:7]
    assert len(stop) == 2
    cut = client.completions.create(model="demo", prompt="def add(a, b):", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_max_tokens_is_clamped_to_model_length(client: openai.OpenAI, server: ServerThread) -> None:
    limit = server.runtime.max_model_length
    prompt_ids = [10 + i % 400 for i in range(limit - 3)]  # leaves room for exactly 3 tokens
    out = client.completions.create(model="demo", prompt=prompt_ids, max_tokens=100_000, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 3


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model": "demo", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": "demo", "prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"model": "demo", "prompt": "hi", "temperature": 3}, "temperature"),
        ({"model": "demo"}, "prompt"),
        ({"prompt": "hi"}, "model"),
        ({"model": "demo", "prompt": "hi", "logprobs": 2}, "logprobs"),
        ({"model": "demo", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "demo", "prompt": "hi", "stream_options": 5}, "stream_options"),
        ({"model": "demo", "prompt": [[1, 2], "x"]}, "prompt"),
    ],
)
def test_malformed_completion_is_400_naming_the_problem(server: ServerThread, body: dict, needle: str) -> None:
    r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_malformed_chat_and_bad_json_are_400(server: ServerThread, client: openai.OpenAI) -> None:
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": "demo", "messages": []}, timeout=30)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": "demo", "messages": [{"role": "wizard", "content": "x"}]}, timeout=30)
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = httpx.post(server.base_url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="maximum length"):
        client.completions.create(model="demo", prompt=[5] * (server.runtime.max_model_length + 1), max_tokens=1)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)


def test_probes(server: ServerThread) -> None:
    assert httpx.get(server.base_url + "/health").status_code == 200
    ready = httpx.get(server.base_url + "/ready")
    assert ready.status_code == 200 and ready.json()["engine"] == "continuous"
