"""``python -m kubeforge`` is the ``kubeforge`` command."""

from .cli import main

raise SystemExit(main())
