"""``python -m kubeforge_runtime.train --config PATH``: one FineTuneJob worker.

torchrun starts this once per process (the pod runs it through ``launch.py``, which checks
the config first and passes torchrun's exit code through). Without torchrun it trains
alone as a world of one. Exit codes: 0 done, 78 configuration error
(``contract.EXIT_CONFIG_ERROR``), 143 stopped by SIGTERM after a checkpoint, 1 a crash.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import contract


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeforge_runtime.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(contract.CONFIG_DIR, contract.CONFIG_FILE),
                        help="the rendered FineTuneJob config (JSON)")
    args = parser.parse_args(argv)
    _setup_logging()
    log = logging.getLogger("kubeforge_runtime.train")

    from .. import data, models, storage
    from .config import ConfigError, load_config

    config_errors = (ConfigError, data.DataError, storage.StorageError, models.ModelLoadError)
    try:
        cfg = load_config(args.config)
    except config_errors as exc:
        log.error("configuration error: %s", exc)
        return contract.EXIT_CONFIG_ERROR

    from .trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg)
        return trainer.run()
    except config_errors as exc:
        log.error("configuration error: %s", exc)
        return contract.EXIT_CONFIG_ERROR
    finally:
        if trainer is not None:
            trainer.close()


if __name__ == "__main__":
    raise SystemExit(main())
