"""The served model's lineage digest: on ``/v1/models`` and in a header of every completion.

A real server (uvicorn, free port) on a copy of the tiny model that carries a sealed
``kubeforge.json``, with an adapter that carries none; clients talk over HTTP.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import openai

from support.serving import make_config
from kubeforge_runtime import lineage
from kubeforge_runtime.serve.app import LINEAGE_HEADER
from kubeforge_runtime.serve.server import ServerThread


def test_models_and_completions_name_the_lineage_digest(start_server: Callable[..., ServerThread], tiny_model: Path,
                                                         tiny_adapter: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    record = lineage.seal({"kind": "QuantizeJob", "name": "q8", "namespace": "default",
                           "output": {"uri": f"file://{model}", **lineage.model_files_digest(model)}})
    lineage.write(model, record)
    server = start_server(make_config(model, adapters=[{"name": "bot", "uri": f"file://{tiny_adapter}"}]))

    models = httpx.get(server.base_url + "/v1/models").json()["data"]
    by_id = {m["id"]: m for m in models}
    assert by_id["demo"]["lineage_digest"] == record["digest"]
    assert by_id["bot"]["lineage_digest"] is None, "an adapter without a lineage record has none"
    # The OpenAI client still parses the list (it ignores the extra field).
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    assert {m.id for m in client.models.list()} == {"demo", "bot"}

    body = {"model": "demo", "prompt": "hello", "max_tokens": 2}
    r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers[LINEAGE_HEADER] == record["digest"]
    chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200 and r.headers[LINEAGE_HEADER] == record["digest"]
    with httpx.stream("POST", server.base_url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        assert s.headers[LINEAGE_HEADER] == record["digest"]
        assert any(line.startswith("data: ") for line in s.iter_lines())
    r = httpx.post(server.base_url + "/v1/completions", json={**body, "model": "bot"}, timeout=60)
    assert r.status_code == 200 and LINEAGE_HEADER not in r.headers
    assert json.loads((model / lineage.LINEAGE_FILE).read_text())["digest"] == record["digest"]
