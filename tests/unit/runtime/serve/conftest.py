"""Fixtures for the serving runtime tests: tiny models on disk and real servers on free ports.

Every server here is the production ``Server`` (uvicorn + gRPC on one loop) run in a thread
of the test process (``ServerThread``), bound to port 0; clients talk to it over real HTTP
and gRPC. Models are the ``tiny`` preset (0.1 M parameters) so the whole directory runs in
well under a minute on two cores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeforge_runtime.serve.config import parse_config
from kubeforge_runtime.serve.server import ServerThread
from kubeforge_runtime.tiny import build_tiny_llama

from support.serving import make_config


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-model"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so it visibly changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-adapter")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    torch.manual_seed(1)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_quantized(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a QuantizeJob writes for int8-weight-only (quantizer's own load and save): int8
    linear layers, int8 embedding and lm_head; config.json carries the quantization_config."""
    from transformers import AutoTokenizer

    from kubeforge_runtime.quantize.methods import get_method

    out = tmp_path_factory.mktemp("tiny-int8")
    method = get_method("int8-weight-only")
    method.save(method.load_quantized(tiny_model, "cpu", 64, embeddings=True), out)
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """Factory: start a server from a config dict; all are stopped at the end of the session."""
    started: list[ServerThread] = []

    def start(config: dict[str, Any], api_key: str | None = None) -> ServerThread:
        server = ServerThread(parse_config(config), api_key=api_key).start()
        started.append(server)
        return server

    yield start
    for s in started:  # ask all to exit first, then wait: shutdowns overlap
        s.request_stop()
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def server(start_server: Callable[..., ServerThread], tiny_model: Path, tiny_adapter: Path) -> ServerThread:
    """The shared server: continuous engine, base model plus one adapter."""
    return start_server(make_config(tiny_model, adapters=[{"name": "support-bot", "uri": f"file://{tiny_adapter}"}]))


@pytest.fixture()
def client(server: ServerThread) -> Any:
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


