"""Build tiny Llama-style models and tokenizers on disk, for tests, examples and benchmarks.

Nothing can be downloaded here, so every test and the no-model path of ``kubeforge run``
builds its model with this module: a ``LlamaForCausalLM`` with random (seeded) weights and
a byte-level BPE tokenizer trained on a small built-in corpus, both written with
``save_pretrained``. Everything downstream then loads them through the ordinary Hugging
Face code path (``AutoModelForCausalLM.from_pretrained``), exactly as it would a real model.

Presets (all sizes divisible by 2 and 4 so tensor and pipeline parallel degrees of 2 and 4
split evenly, as gloo's all_gather requires):

* ``tiny``  - 4 layers, hidden 64: about 0.1 M parameters; unit and torchrun tests.
* ``small`` - 6 layers, hidden 512, vocabulary 8000: about 26 M parameters; benchmarks.

Command line: ``python -m kubeforge_runtime.tiny OUT_DIR [--preset tiny|small] [--seed N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# A simple chat template: role markers as plain text, end of turn as the EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}" + EOS + "\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A model learns the patterns in its data.
Kubernetes schedules pods onto nodes; a job runs pods until they succeed.
Question: What is the capital of France? Answer: Paris.
Question: How many legs does a spider have? Answer: Eight.
def add(a, b):\n    return a + b\n
for i in range(10):\n    print(i * i)\n
class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n
This movie was wonderful and I loved it. Sentiment: positive.
The food was cold and the service was slow. Sentiment: negative.
Training with data parallelism splits each batch across workers and averages gradients.
Tensor parallelism splits each weight matrix; pipeline parallelism splits the layers.
Quantization stores weights in fewer bits so the model is smaller and often faster.
user assistant system hello world thanks please answer the question briefly.
0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } : ; , . ! ? ' " # @
"""


@dataclass(frozen=True)
class TinyPreset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # model vocabulary (>= tokenizer vocabulary, padded to a multiple of 64)
    tokenizer_vocab: int
    max_position_embeddings: int


PRESETS: dict[str, TinyPreset] = {
    "tiny": TinyPreset(64, 128, 4, 4, 2, 512, 512, 512),
    "small": TinyPreset(512, 1376, 6, 8, 4, 8000, 2048, 1024),
}


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, extra_text: str = ""):
    """Train a byte-level BPE tokenizer on the built-in corpus and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (_CORPUS + extra_text).splitlines()
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight Llama model and its tokenizer to ``out_dir``; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, vocab_size=p.tokenizer_vocab)
    vocab = max(p.vocab_size, -(-len(tokenizer) // 64) * 64)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "kubeforge-tiny.json").write_text(json.dumps({"preset": preset, "seed": seed}) + "\n")
    log.info("built %s model (%d parameters) in %s", preset, model.num_parameters(), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(build_tiny_llama(args.out_dir, args.preset, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
