"""The control plane never imports torch; the runtime never imports kopf or kubernetes.

Each side's every module is imported in a fresh interpreter, then ``sys.modules`` is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import importlib, json, pkgutil, sys
pkg = importlib.import_module(sys.argv[1])
skip = set(sys.argv[3].split(",")) if len(sys.argv) > 3 and sys.argv[3] else set()
for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    if info.name.endswith("__main__") or any(info.name.startswith(s) for s in skip):
        continue
    importlib.import_module(info.name)
forbidden = [m for m in sys.argv[2].split(",") if m in sys.modules]
print(json.dumps(forbidden))
"""


def _forbidden_imports(package: str, forbidden: list[str], skip: list[str] | None = None) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, package, ",".join(forbidden), ",".join(skip or [])],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_control_plane_never_imports_torch():
    assert _forbidden_imports("kubeforge", ["torch", "transformers", "torchao", "peft", "deepspeed"]) == []


def test_runtime_never_imports_kopf_or_kubernetes():
    assert _forbidden_imports("kubeforge_runtime", ["kopf", "kubernetes"]) == []


def test_stdlib_operator_module_still_works():
    out = subprocess.run([sys.executable, "-c", "import operator, kubeforge; print(operator.add(2, 3))"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "5", out.stderr
    assert not (REPO / "operator" / "__init__.py").exists()


def test_serving_does_not_import_the_quantizer():
    """The rules of loading a quantized output (REJECTED marker, loadRequires) live in
    kubeforge_runtime/models.py, below both serve/ and quantize/; serve/ never imports quantize/."""
    import ast

    serve = REPO / "trainer_image" / "kubeforge_runtime" / "serve"
    packages = {0: "", 1: "kubeforge_runtime.serve.", 2: "kubeforge_runtime."}
    offenders = []
    for path in sorted(serve.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = packages[node.level] + (node.module or "")
                targets = [base] + [f"{base}.{a.name}".replace("..", ".") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            if any(t == "kubeforge_runtime.quantize" or t.startswith("kubeforge_runtime.quantize.") for t in targets):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


_NO_OPERATOR_PROBE = """
import json, sys
import kubeforge.kube, kubeforge.manifests, kubeforge.sdk
try:  # an invalid spec: the path that formats validation errors
    kubeforge.manifests.parse_resource({"apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob",
                                        "metadata": {"name": "q"}, "spec": {"method": "int3"}})
except kubeforge.manifests.ManifestError:
    pass
print(json.dumps(sorted(m for m in sys.modules if m == "kopf" or m.startswith("kubeforge.controllers"))))
"""


def test_sdk_and_manifests_do_not_start_the_operator():
    """Using the SDK or the manifest reader registers no kopf handler: neither imports
    ``kubeforge.controllers`` (whose import registers every reconciler) nor kopf itself."""
    probe = _NO_OPERATOR_PROBE
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
