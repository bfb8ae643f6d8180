"""``engine.compile``: a compiled server answers as the eager one does, and compiles before /ready.

Real servers over real HTTP with the official ``openai`` client, on the tiny model. The
compiled path is forced with ``compile: on`` (on this CPU ``auto`` is eager; see
``serve/decode.py``) on the continuous engine (the dynamic one always runs eager); its greedy
answers must equal the eager server's token for token, sequentially and batched, and no
request after ``/ready`` may trigger a compilation (the warm-up compiled every shape).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from kubeforge_runtime.serve.config import parse_config
from kubeforge_runtime.serve.decode import decode_plan
from kubeforge_runtime.serve.server import ServerThread
from support.serving import make_config

PROMPTS = ["The quick brown fox", "def add(a, b):", "hello", "Kubernetes schedules pods", "0 1 2 3"]


def _answers(server: ServerThread) -> list[str]:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)

    def one(prompt: str) -> str:
        out = client.completions.create(model="demo", prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        return out.choices[0].text

    sequential = [one(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched together in the engine
        concurrent = list(pool.map(one, PROMPTS))
    assert concurrent == sequential
    return sequential


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["stats"].values()) + sum(counters["frames"].values())


# Compiling the tiny model's batch step took 4-6 minutes of a 2-core machine shared with six
# other sessions (load average 12-35), more than the suite's default 10-minute limit once.
@pytest.mark.timeout(1800)
def test_compiled_server_answers_like_the_eager_one_and_compiles_before_ready(
    start_server: Callable[..., ServerThread], tiny_model: Path, request: pytest.FixtureRequest
) -> None:
    batching = "continuous"
    eager = start_server(make_config(tiny_model, batching=batching, compile="off"))
    assert eager.runtime.models["demo"].engine.plan.compile is False
    expected = _answers(eager)

    import torch

    # Compiled code is cached per function, not per model: start from an empty cache so this
    # server's warm-up has to compile, whatever compiled the same model code before.
    torch._dynamo.reset()
    at_start = _graphs_compiled()
    # Compiling takes minutes on a busy 2-core machine: a longer wait for /ready than the
    # shared fixture's.
    compiled = ServerThread(parse_config(make_config(tiny_model, batching=batching, compile="on"))).start(wait_ready=1200)
    request.addfinalizer(compiled.stop)
    engine = compiled.runtime.models["demo"].engine
    assert engine.plan.compile is True and engine.name == batching
    # ServerThread.start returns once /ready is true: the compilation happened before it.
    assert httpx.get(compiled.base_url + "/ready").status_code == 200
    before = _graphs_compiled()
    assert before > at_start, "the warm-up compiled nothing"
    assert _answers(compiled) == expected
    assert _graphs_compiled() == before, "a request after /ready triggered a compilation"


def test_auto_plan_per_device() -> None:
    assert decode_plan("auto", "cuda").cuda_graphs is True
    assert decode_plan("off", "cuda").cuda_graphs is False and decode_plan("off", "cuda").compile is False
    assert decode_plan("on", "cpu").compile is True and decode_plan("on", "cpu").cuda_graphs is False
    assert decode_plan("auto", "cpu").describe().startswith("cpu, ")
    cpu = decode_plan("on", "cpu").continuous_batching_kwargs()
    assert cpu["use_cuda_graph"] is False and cpu["varlen_compile_config"].dynamic is True
    assert "decode_compile_config" not in cpu and cpu["q_padding_interval_size"] == 1  # a CPU decode step stays 1 token
    assert decode_plan("off", "cpu").continuous_batching_kwargs() == {"use_cuda_graph": False}
    assert decode_plan("auto", "cuda").continuous_batching_kwargs()["use_cuda_graph"] is True
    eager = decode_plan("on", "cpu").without_compile("the dynamic engine runs eager")
    assert not eager.compile and eager.describe() == "cpu, eager (engine.compile: on; the dynamic engine runs eager)"
    with pytest.raises(ValueError, match="engine.compile"):
        decode_plan("fast", "cpu")  # type: ignore[arg-type]
