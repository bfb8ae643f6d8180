"""Entry point of the InferenceService pod: ``python -m kubeforge_runtime.serve --config PATH``.

Exit codes: 0 after a clean shutdown (SIGTERM), 78 (``contract.EXIT_CONFIG_ERROR``) when the
config file is unreadable or invalid (retrying cannot help), 1 when the model fails to load.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import contract


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeforge_runtime.serve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=os.path.join(contract.CONFIG_DIR, contract.CONFIG_FILE), help="the rendered JSON config"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (HTTP and gRPC)")
    parser.add_argument("--log-level", default=os.environ.get("KUBEFORGE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("kubeforge_runtime.serve")

    from .config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return contract.EXIT_CONFIG_ERROR
    from .server import Server

    try:
        server = Server(config, host=args.host)
    except OSError as exc:  # port in use or not permitted
        log.error("cannot bind port %d: %s", config.port, exc)
        return contract.EXIT_CONFIG_ERROR
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
