"""Put a model (and its adapters) in a local directory: the init step of a vLLM serving pod.

``python -m kubeforge_runtime.fetch --into DIR NAME=URI [NAME=URI ...]`` resolves each URI
with the runtime's own storage code (:func:`kubeforge_runtime.storage.resolve`: ``pvc://`` and
``file://`` are local paths, ``s3://`` and ``hf://`` are downloaded into the cache) and links
``DIR/NAME`` to the result, so that a server that only reads local directories (vLLM's
OpenAI server, rendered by ``kubeforge.builders.vllm``) gets ``DIR/base`` and one directory
per adapter. Exit codes: 0 done, 78 (``EX_CONFIG``) an argument or a URI that names nothing,
69 (``EX_UNAVAILABLE``) a download that failed; the reason goes to the termination log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import contract, storage

log = logging.getLogger("kubeforge_runtime.fetch")
EX_CONFIG, EX_UNAVAILABLE = 78, 69


def parse_pairs(pairs: list[str]) -> list[tuple[str, str]]:
    """``NAME=URI`` arguments as pairs; a malformed one raises ValueError naming it."""
    out = []
    for pair in pairs:
        name, sep, uri = pair.partition("=")
        if not sep or not name or not uri or "/" in name:
            raise ValueError(f"{pair!r}: expected NAME=URI with a NAME free of '/'")
        out.append((name, uri))
    return out


def fetch(into: Path, pairs: list[tuple[str, str]]) -> dict[str, Path]:
    """Resolve every URI and link ``into/NAME`` to it; returns the links' targets."""
    into.mkdir(parents=True, exist_ok=True)
    done: dict[str, Path] = {}
    for name, uri in pairs:
        target = storage.resolve(uri).resolve()
        link = into / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(target, link)
        log.info("%s: %s -> %s", name, uri, target)
        done[name] = target
    return done


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m kubeforge_runtime.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("--into", required=True, type=Path, help="Directory that receives one link per NAME.")
    parser.add_argument("pairs", nargs="+", metavar="NAME=URI")
    args = parser.parse_args(argv)
    try:
        fetch(args.into, parse_pairs(args.pairs))
    except (ValueError, storage.StorageError) as exc:
        return _fail(EX_CONFIG, str(exc))
    except storage.DownloadFailed as exc:
        return _fail(EX_UNAVAILABLE, str(exc))
    return 0


def _fail(code: int, message: str) -> int:
    log.error("%s", message)
    try:
        Path(os.environ.get(contract.ENV_REPORT_PATH, contract.TERMINATION_LOG)).write_text(message[:4000])
    except OSError:
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
