"""Run the operator: ``kubeforge operator`` and ``python -m kubeforge operator``."""

from __future__ import annotations

import logging


def run_operator(namespaces: list[str] | None, *, liveness_port: int | None = None,
                 standalone: bool = False, peering: str | None = None, verbose: bool = False) -> None:
    import kopf

    import kubeforge.controllers  # noqa: F401  (registers the handlers)

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = {}
    if liveness_port:
        kwargs["liveness_endpoint"] = f"http://0.0.0.0:{liveness_port}/healthz"
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces or [],
        standalone=standalone,
        peering_name=peering,
        **kwargs,
    )
