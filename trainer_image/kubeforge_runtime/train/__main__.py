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
    from . import allocator

    # before any weight is allocated (allocator.py says why); torchrun sets WORLD_SIZE
    allocator.configure(int(os.environ.get("WORLD_SIZE", "1")))

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


def _exit(code: int) -> None:
    """Leave without running C++ static destructors when this was one rank of several.

    Under torchrun, a rank that has finished (barrier passed, process group destroyed) could
    still abort in interpreter teardown ("terminate called without an active exception",
    SIGABRT) while a gloo or pipelining background thread was being destroyed; torchrun
    then reports the whole run as failed although every rank finished. Seen once in
    the first fifty or so pipeline-parallel test runs here. Everything worth keeping is written and
    flushed before this point, so a finished rank exits with its own code at once.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    _exit(main())
