"""The SDK example in the README runs as written (from the repository root's layout)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.torchrun


def readme_python_blocks(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 3)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


@pytest.mark.timeout(900)
def test_sdk_example_runs_as_written(tmp_path: Path):
    blocks = readme_python_blocks("Python SDK")
    assert blocks, "the README's Python SDK section has no python block"
    (tmp_path / "examples").symlink_to(REPO / "examples")
    script = tmp_path / "readme_sdk.py"
    script.write_text("\n".join(blocks))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=880)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "fine-tuned:" in out.stdout and "compressed x" in out.stdout
    assert (tmp_path / "kubeforge-runs").is_dir()
