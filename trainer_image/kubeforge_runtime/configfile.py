"""Read the JSON config file the operator mounts, for every entry point (train, quantize, serve).

Each entry point parses the object with its own strict schema; this module only turns "the
file is missing/unreadable/not JSON/not an object" into the entry point's own ``ConfigError``
with a message that names the file, so all three report those mistakes the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_config_object(path: str | Path, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in ``path``; raises ``error`` saying what is wrong with the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise error(f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"config file {p} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise error(f"config file {p} must hold a JSON object, not {type(data).__name__}")
    return data
