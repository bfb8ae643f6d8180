#!/usr/bin/env bash
# The main job, from nothing: install KubeForge into a virtual environment, then run the
# example pipeline locally (fine-tune -> quantize -> serve -> one sample request), no cluster.
# Extra arguments go to `kubeforge run` (e.g. --model DIR to start from your own model).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash hack/setup-python.sh | tail -n 1)
exec "$VENV/bin/kubeforge" run -f examples/pipeline.yaml "$@"
