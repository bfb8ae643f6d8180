"""Build a smaller student from a causal LM: the same config with fewer decoder layers,
initialised from the source's own layers (and its embeddings, final norm and head).

Used by ``benchmarks/bench_distill.py`` to make the student a distillation run starts from
(``method: distill`` with the source as ``distillation.teacher``); a user can run it the same
way. Layers are picked evenly across the stack, first and last included (the common
layer-dropping initialisation of distilled students, e.g. DistilBERT's every other layer).
Llama-family models only (``model.layers.<i>.`` parameter names).

Command line::

    python -m kubeforge_runtime.student SRC_DIR DST_DIR --layers 6
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def spread(total: int, keep: int) -> list[int]:
    """``keep`` layer indices out of ``total``, evenly spaced, first and last included."""
    if not 1 <= keep <= total:
        raise ValueError(f"--layers {keep}: choose between 1 and the source's {total} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def build_student(src: str | Path, dst: str | Path, layers: int) -> Path:
    """Write the student to ``dst`` (save_pretrained, with the source's tokenizer); return ``dst``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, dst = Path(src), Path(dst)
    config = AutoConfig.from_pretrained(str(src))
    kept = spread(int(config.num_hidden_layers), layers)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    source = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    state = {}
    for key, value in source.state_dict().items():
        m = _LAYER.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in kept:
            state[f"model.layers.{kept.index(int(m.group(1)))}.{key[m.end():]}"] = value
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    student.load_state_dict(state, strict=True)
    dst.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(str(dst), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))
    (dst / "kubeforge-student.json").write_text(json.dumps({"source": str(src), "layers": kept}) + "\n")
    log.info("student with layers %s of %s (%d parameters) in %s", kept, src, student.num_parameters(), dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeforge_runtime.student", description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--layers", type=int, required=True, help="decoder layers the student keeps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    build_student(args.src, args.dst, args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
