#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install KubeForge into it with the
# operator, runtime and dev extras. Prints the venv's directory on the last line.
# Used by .ci/run and hack/quickstart.sh; override the location with KUBEFORGE_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${KUBEFORGE_CACHE:-$HOME/.cache/kubeforge}"
VENV="${KUBEFORGE_VENV:-$CACHE/venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
"$VENV/bin/python" -m pip install -q -e ".[operator,runtime,dev,deepspeed]" >&2
echo "$VENV"
