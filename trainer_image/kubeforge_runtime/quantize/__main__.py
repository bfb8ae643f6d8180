"""``python -m kubeforge_runtime.quantize --config PATH``: see ``runner``."""

from __future__ import annotations

from .runner import main

raise SystemExit(main())
