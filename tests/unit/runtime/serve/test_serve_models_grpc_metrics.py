"""Adapters and quantized models, the API key, the gRPC endpoint and the vLLM-named metrics."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from support.serving import make_config, metric_value
from kubeforge_runtime.serve import grpc_server as g
from kubeforge_runtime.serve.server import ServerThread

VLLM_METRICS = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds_count",
    "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:request_queue_time_seconds_count",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
]


def _greedy(client: openai.OpenAI, model: str, prompt: str = "The quick brown fox", n: int = 12) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}).choices[0].text


def test_adapter_is_served_under_its_own_name(client: openai.OpenAI, tiny_model: Path, tiny_adapter: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_text = _greedy(client, "demo")
    adapter_text = _greedy(client, "support-bot")
    assert adapter_text != base_text  # the adapter changes the model
    # ... into exactly base + LoRA, as peft computes it
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(tiny_adapter)).eval()
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert adapter_text == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_quantized_output_is_served(start_server: Callable[..., ServerThread], tiny_quantized: Path) -> None:
    server = start_server(make_config(tiny_quantized, name="int8"))
    assert server.runtime.backend == "continuous"
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    out = client.completions.create(model="int8", prompt="hello", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 6 and out.choices[0].text
    quant = json.loads((tiny_quantized / "config.json").read_text())["quantization_config"]
    assert quant["include_input_output_embeddings"] is True  # the embeddings it served were int8


def test_api_key_is_enforced(start_server: Callable[..., ServerThread], tiny_model: Path) -> None:
    server = start_server(make_config(tiny_model, name="locked", maxConcurrentRequests=2), api_key="s3cret")
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="locked", prompt="hi", max_tokens=2)
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    good = openai.OpenAI(base_url=server.base_url + "/v1", api_key="s3cret", max_retries=0)
    assert good.completions.create(model="locked", prompt="hi", max_tokens=2, temperature=0).usage.completion_tokens >= 1
    # probes and metrics stay open: kubelet and Prometheus carry no key
    assert httpx.get(server.base_url + "/ready").status_code == 200
    assert httpx.get(server.base_url + "/metrics").status_code == 200
    # gRPC too
    with grpc.insecure_channel(f"127.0.0.1:{server.server.grpc_port}") as channel:
        call = channel.unary_unary(g.GENERATE, request_serializer=g.GenerateRequest.SerializeToString, response_deserializer=g.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            call(g.GenerateRequest(model="locked", prompt="hi", max_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = call(g.GenerateRequest(model="locked", prompt="hi", max_tokens=2), metadata=(("authorization", "Bearer s3cret"),))
        assert ok.completion_tokens >= 1


def test_grpc_generate_matches_http(server: ServerThread, client: openai.OpenAI) -> None:
    http_text = _greedy(client, "demo", "Kubernetes schedules pods", 10)
    with grpc.insecure_channel(f"127.0.0.1:{server.server.grpc_port}") as channel:
        unary = channel.unary_unary(g.GENERATE, request_serializer=g.GenerateRequest.SerializeToString, response_deserializer=g.GenerateResponse.FromString)
        stream = channel.unary_stream(g.GENERATE_STREAM, request_serializer=g.GenerateRequest.SerializeToString, response_deserializer=g.GenerateResponse.FromString)
        req = g.GenerateRequest(model="demo", prompt="Kubernetes schedules pods", max_tokens=10)  # temperature 0: greedy
        out = unary(req, timeout=60)
        pieces = list(stream(req, timeout=60))
        adapter = unary(g.GenerateRequest(model="support-bot", prompt="Kubernetes schedules pods", max_tokens=10), timeout=60)
        with pytest.raises(grpc.RpcError) as err:
            unary(g.GenerateRequest(model="nope", prompt="x"), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            unary(g.GenerateRequest(model="demo", prompt="x", temperature=5), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()
    if out.finish_reason == "length":
        assert out.completion_tokens == 10
    assert out.text == http_text or http_text.startswith(out.text)  # ignore_eos only exists on HTTP
    assert "".join(p.text for p in pieces) == out.text
    assert pieces[-1].finish_reason == out.finish_reason and pieces[-1].completion_tokens == out.completion_tokens
    assert adapter.text != out.text


def test_grpc_overload_is_resource_exhausted(start_server: Callable[..., ServerThread], tiny_model: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server = start_server(make_config(tiny_model, name="tight", maxConcurrentRequests=1, maxQueuedRequests=0))
    with grpc.insecure_channel(f"127.0.0.1:{server.server.grpc_port}") as channel:
        call = channel.unary_unary(g.GENERATE, request_serializer=g.GenerateRequest.SerializeToString, response_deserializer=g.GenerateResponse.FromString)

        def one(_: int) -> grpc.StatusCode:
            try:
                call(g.GenerateRequest(model="tight", prompt_token_ids=[5, 6, 7], max_tokens=200), timeout=60)
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(one, range(4)))
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes


def test_metrics_have_vllm_names_and_count(server: ServerThread, client: openai.OpenAI) -> None:
    before = httpx.get(server.base_url + "/metrics").text
    client.completions.create(model="demo", prompt="hello", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    text = httpx.get(server.base_url + "/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for name in VLLM_METRICS:
        assert name in names, name
    gen = metric_value(text, "vllm:generation_tokens_total", model_name="demo") - metric_value(before, "vllm:generation_tokens_total", model_name="demo")
    assert gen == 5
    done = metric_value(text, "vllm:request_success_total", model_name="demo", finished_reason="length")
    assert done - metric_value(before, "vllm:request_success_total", model_name="demo", finished_reason="length") == 1
    assert 0.0 <= metric_value(text, "vllm:kv_cache_usage_perc") <= 1.0


def test_rejected_quantized_output_is_refused(tiny_quantized: Path, tmp_path: Path) -> None:
    import shutil

    from kubeforge_runtime.serve.config import parse_config
    from kubeforge_runtime.serve.service import ServingRuntime

    rejected = tmp_path / "rejected"
    shutil.copytree(tiny_quantized, rejected)
    (rejected / "REJECTED").write_text('{"reason": "QualityGateFailed"}\n')
    runtime = ServingRuntime(parse_config(make_config(rejected)))
    with pytest.raises(RuntimeError, match="failed its quality gate"):
        runtime.load()
    assert not runtime.ready.is_set()
