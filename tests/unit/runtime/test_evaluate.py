"""Task evaluation by generation (kubeforge_runtime.evaluate) and its pass@1 sandbox.

Metrics are checked on hand-made cases with exact expected numbers; generation on the tiny
random model (its answers are noise, but batched and one-at-a-time greedy decoding must
agree); the sandbox on programs that try what generated code must not do.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from kubeforge_runtime.data import DataError
from kubeforge_runtime.evaluate import (METRICS, EvalExample, answer_end, build_program, evaluate, generate, load_examples,
                                        max_new_tokens_for, score)
from kubeforge_runtime.sandbox import run_python


def ex(reference: str, prompt: str = "Q: ", tests: str | None = None) -> EvalExample:
    return EvalExample(prompt=prompt, reference=reference, tests=tests)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared two-core machine more threads only contend (10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubeforge_runtime.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from kubeforge_runtime.models import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model: Path):
    from kubeforge_runtime.models import load_causal_lm

    return load_causal_lm(tiny_model)


# --- metrics ----------------------------------------------------------------------------------

def test_constant_answerer_scores_chance_on_a_balanced_set():
    examples = [ex("positive"), ex("negative"), ex("Positive"), ex("negative.")]
    result = score("accuracy", ["positive"] * 4, examples)
    assert result == {"metric": "accuracy", "value": 0.5, "samples": 4, "correct": 2,
                      "perLabel": {"positive": 1.0, "negative": 0.0}}


def test_accuracy_ignores_case_punctuation_and_spacing_but_not_extra_words():
    examples = [ex("positive"), ex("Negative"), ex("New  York"), ex("positive"), ex("yes")]
    predictions = [" POSITIVE!", "negative.", "new york?!", "positive negative", "yes, because it is"]
    result = score("accuracy", predictions, examples)
    assert (result["correct"], result["value"]) == (3, 0.6)


def test_accuracy_reads_the_first_non_empty_line_only():
    examples = [ex("negative"), ex("negative"), ex("positive")]
    predictions = ["\n\n  negative\npositive", "The answer is\nnegative", "positive\n" + "blah " * 50]
    result = score("accuracy", predictions, examples)
    assert result["correct"] == 2 and result["value"] == pytest.approx(2 / 3)


def test_exact_match_uses_squad_normalisation():
    examples = [ex("Eiffel tower"), ex("apple"), ex("Eiffel Tower"), ex("Paris"), ex("the U.S.")]
    predictions = ["The Eiffel Tower.", "an apple", "Eiffel Tower in Paris", "Paris\nLondon", "US"]
    result = score("exactMatch", predictions, examples)
    assert result == {"metric": "exactMatch", "value": 0.8, "samples": 5, "correct": 4}


def test_f1_is_squad_token_f1_averaged():
    examples = [ex("the Eiffel Tower"), ex("London"), ex("cat sat"), ex("x"), ex("big red dog")]
    predictions = ["Eiffel Tower in Paris",  # 2 common; p = 2/4, r = 2/2 -> 2/3
                   "Paris",                   # 0
                   "The cat sat.",            # 1
                   "",                        # empty prediction -> 0
                   "red dog\nbig"]            # first line only; p = 1, r = 2/3 -> 0.8
    result = score("f1", predictions, examples)
    assert result["metric"] == "f1" and result["samples"] == 5 and "correct" not in result
    assert result["value"] == pytest.approx((2 / 3 + 0 + 1 + 0 + 0.8) / 5)


def test_score_refuses_mismatched_lengths_and_unknown_metrics():
    assert METRICS == ("accuracy", "exactMatch", "f1", "passAtOne")
    with pytest.raises(ValueError, match="2 predictions for 1"):
        score("accuracy", ["a", "b"], [ex("a")])
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", ["a"], [ex("a")])


def test_max_new_tokens_follows_the_longest_reference_within_bounds(tokenizer):
    class Words:  # one token per word, so the numbers are exact
        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            return {"input_ids": list(range(len(text.split())))}

    words = Words()
    assert max_new_tokens_for(words, [ex("yes"), ex("a b c d e f g h i j k l")], "exactMatch") == 12 + 4
    assert max_new_tokens_for(words, [ex(" ".join(["w"] * 40))], "f1") == 40 + 10
    assert max_new_tokens_for(words, [ex("w " * 500)], "accuracy") == 256
    assert max_new_tokens_for(words, [ex("w " * 10)], "passAtOne") == 2 * 10 + 32
    assert max_new_tokens_for(words, [], "accuracy") == 4
    assert 4 <= max_new_tokens_for(tokenizer, [ex("positive")], "accuracy") <= 8


# --- loading ----------------------------------------------------------------------------------

def test_load_prompt_completion_takes_the_first_max_samples(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"Q{i}: ", "completion": f"A{i}", "label": "x"}
                                               for i in range(5)])
    examples = load_examples(path, "prompt-completion", tokenizer, max_samples=3)
    assert [(e.prompt, e.reference, e.tests) for e in examples] == [("Q0: ", "A0", None), ("Q1: ", "A1", None),
                                                                    ("Q2: ", "A2", None)]
    assert examples[2].source == f"{path}:3"
    assert len(load_examples(path, "prompt-completion", tokenizer)) == 5


def test_load_chat_prompts_up_to_the_last_assistant_message(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    [example] = load_examples(path, "chat", tokenizer)
    assert example.reference == "Paris"
    assert example.prompt == tokenizer.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
    assert example.prompt == ("<|system|>\nBe brief.</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n4</s>\n"
                              "<|user|>\nCapital of France?</s>\n<|assistant|>\n")


def test_load_chat_refuses_records_without_a_prompt_or_answer(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
    ])
    with pytest.raises(DataError) as err:
        load_examples(path, "chat", tokenizer)
    assert f"{path}:2: no message before" in str(err.value) and f"{path}:3: the last assistant" in str(err.value)


def test_text_format_is_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="needs prompts and answers"):
        load_examples(path, "text", tokenizer)


def test_bad_records_are_reported_by_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(DataError, match=f"{path}:2"):
        load_examples(path, "prompt-completion", tokenizer)


def test_pass_at_one_needs_tests_in_every_record(tmp_path, tokenizer):
    records = [{"prompt": "def f():\n", "completion": "    return 1\n", "tests": "assert f() == 1"},
               {"prompt": "def g():\n", "completion": "    return 2\n"},
               {"prompt": "def h():\n", "completion": "    return 3\n", "tests": ["not", "a", "string"]}]
    path = write_jsonl(tmp_path / "code.jsonl", records)
    assert len(load_examples(path, "prompt-completion", tokenizer)) == 3  # fine for other metrics
    with pytest.raises(DataError) as err:
        load_examples(path, "prompt-completion", tokenizer, metric="passAtOne")
    message = str(err.value)
    assert "2 bad record(s)" in message and f"{path}:2:" in message and f"{path}:3:" in message
    assert f"{path}:1:" not in message and '"tests"' in message
    examples = load_examples(path, "prompt-completion", tokenizer)
    with pytest.raises(DataError, match=f"{path}:2"):
        score("passAtOne", ["    return 2\n"] * 3, examples)


# --- generation -------------------------------------------------------------------------------

PROMPTS = ["Question: What is the capital of France? Answer:", "def add(a, b):", "Hi",
           "The quick brown fox jumps over the lazy dog. A model learns the patterns", "Sentiment:"]


def assert_batched_equals_single(model, tokenizer) -> None:
    tokenizer.padding_side = "right"
    # Stages of 3 tokens: each batch goes on from the cache its last stage returned.
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2, stage_tokens=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert len(batched) == len(PROMPTS) and all(isinstance(s, str) for s in batched)
    assert batched == single
    assert tokenizer.padding_side == "right"


def test_generate_batched_with_left_padding_equals_one_at_a_time(model, tokenizer):
    model.train()
    assert_batched_equals_single(model, tokenizer)
    assert model.training  # the caller's mode is given back
    assert generate(model, tokenizer, [], 8) == []


def test_generate_works_for_peft_and_torchao_models(tiny_model, model, tokenizer):
    import torch
    from peft import LoraConfig, get_peft_model

    from kubeforge_runtime.models import load_causal_lm
    from kubeforge_runtime.quantize.methods import get_method

    torch.manual_seed(0)  # the random LoRA weights: batched == single compares greedy tokens, the same draw each run
    lora = get_peft_model(load_causal_lm(tiny_model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                 init_lora_weights=False))
    assert_batched_equals_single(lora, tokenizer)
    quantized = get_method("int8-weight-only").load_quantized(tiny_model, "cpu", 64)
    assert_batched_equals_single(quantized, tokenizer)


def test_generate_decodes_new_tokens_only_and_stops_at_eos(tokenizer):
    import torch

    answer = tokenizer("Paris", add_special_tokens=False)["input_ids"]
    after = tokenizer(" and more", add_special_tokens=False)["input_ids"]
    seen: dict[str, Any] = {}

    class Scripted(torch.nn.Module):
        """Answers "Paris", EOS, then more text, whatever the prompt."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, **kwargs):
            seen.update(kwargs, input_ids=input_ids, attention_mask=attention_mask)
            new = torch.tensor([answer + [tokenizer.eos_token_id] + after] * len(input_ids))
            return torch.cat([input_ids, new], dim=1)

    out = generate(Scripted(), tokenizer, ["Capital of France?", "Hi"], max_new_tokens=9, stage_tokens=16)
    assert out == ["Paris", "Paris"]
    assert seen["do_sample"] is False and seen["max_new_tokens"] == 9
    assert tokenizer.eos_token_id in seen["eos_token_id"]
    short, width = len(tokenizer("Hi")["input_ids"]), seen["input_ids"].shape[1]
    row = min(range(2), key=lambda r: int(seen["attention_mask"][r].sum()))  # the "Hi" row
    assert seen["attention_mask"][row].tolist() == [0] * (width - short) + [1] * short  # left padding
    assert (seen["input_ids"][row, :width - short] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("metric, text, end", [
    ("accuracy", "positive", None),  # the line may go on
    ("accuracy", "\n\npositive\nReview: more", len("\n\npositive\n")),  # leading blank lines skipped
    ("exactMatch", "  \n", None),
    ("f1", "Paris.\n", len("Paris.\n")),
    ("passAtOne", "def add(a, b):\n# not yet: no body", None),
    ("passAtOne", "def add(a, b):\n    # inside\n    return a + b\n", None),
    ("passAtOne", "def add(a, b):\n    return a + b\n\n# Write a function sub", len("def add(a, b):\n    return a + b\n")),
    ("passAtOne", "def f():\n    return 1\nprint(f())", len("def f():\n    return 1")),
    ("passAtOne", "def f():\n    return 1\nassert f() == 1", len("def f():\n    return 1")),
    ("passAtOne", "def f():\n    return 1\nif __name__ == '__main__':", len("def f():\n    return 1")),
    ("passAtOne", "```python\ndef f():\n    return 1\n```\nThis returns one.", len("```python\ndef f():\n    return 1")),
    ("passAtOne", "def f():\n    return g()\ndef g():\n    return 1", None),  # helpers are part of it
])
def test_answer_end_marks_where_the_scored_part_is_complete(metric, text, end):
    assert answer_end(metric, text) == end


class ScriptedWriting:
    """Test device (the random tiny model never writes a newline): a forward hook on
    ``lm_head`` that makes the row of ``PROMPTS[p]`` write ``texts[p % len(texts)]`` (text or
    token ids) and then
    the filler "x" forever (with ``filler=False``: the model's own tokens after the script),
    through transformers' real ``generate`` loop and our stopping criterion. Rows are told
    apart by their left padding (the prompts' token counts differ), the step by the attention
    mask's length, so the script follows each row when finished rows leave the batch;
    ``batch_sizes`` records the rows of every forward pass, ``widths`` its input tokens."""

    def __init__(self, model, tokenizer, texts: list[str | list[int]], filler: bool = True) -> None:
        import torch

        lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
        assert len(set(lengths)) == len(lengths), "the device tells rows apart by their prompt lengths"
        self.width = max(lengths)
        tokens = [t if isinstance(t, list) else tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        self.scripts = {self.width - n: tokens[p % len(tokens)] for p, n in enumerate(lengths)}  # padding -> script
        self.filler = tokenizer("x", add_special_tokens=False)["input_ids"][-1] if filler else None
        self.mask, self.batch_sizes, self.widths, self.torch = None, [], [], torch
        self.hooks = [model.register_forward_pre_hook(self.see, with_kwargs=True),
                      model.lm_head.register_forward_hook(self.write)]

    def see(self, module, args, kwargs):
        self.mask = kwargs["attention_mask"]
        self.batch_sizes.append(self.mask.shape[0])
        self.widths.append(kwargs["input_ids"].shape[1])

    def write(self, module, inputs, logits):
        step = self.mask.shape[1] - self.width
        for b in range(logits.shape[0]):
            script = self.scripts[int((self.mask[b] == 0).sum())]
            token = script[step] if step < len(script) else self.filler
            if token is not None:
                logits[b, -1, token] += 1e4
        return logits

    def __enter__(self) -> "ScriptedWriting":
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self.hooks:
            hook.remove()


def scripted(model, tokenizer, texts: list[str], metric: str | None, **kwargs: Any) -> list[str]:
    with ScriptedWriting(model, tokenizer, texts):
        return generate(model, tokenizer, PROMPTS, max_new_tokens=32, batch_size=5, metric=metric, **kwargs)


@pytest.mark.parametrize("metric, texts", [
    ("accuracy", ["positive\nReview:", "\nnegative\n", "neutral", "a b c d e\n"]),
    ("passAtOne", ["def f():\n    return 1\n# next task\n", "def g(a):\n    return a\n\nprint(g(2))"]),
])
def test_generate_stops_each_row_once_its_answer_is_complete(model, tokenizer, metric, texts):
    whole = scripted(model, tokenizer, texts, None)
    stopped = scripted(model, tokenizer, texts, metric)
    ends = [answer_end(metric, w) for w in whole]
    assert any(e is not None for e in ends), whole
    for w, s, e in zip(whole, stopped, ends):
        if e is None:  # nothing complete within the cap: the row ran to it, as before
            assert s == w
        else:  # stopped once complete and cut at the end of what is scored
            assert s == w[:e] and len(s) < len(w)


def test_finished_rows_leave_the_batch_between_stages(model, tokenizer):
    """Rows whose answers are complete leave the batch at the end of their stage (a batch
    decodes only as long as its unfinished rows need); the answers are those of one stage."""
    texts = ["positive\nReview:", "\nnegative\n", "neutral", "a b c d e\n"]  # one row never ends its line
    with ScriptedWriting(model, tokenizer, texts) as device:
        staged = generate(model, tokenizer, PROMPTS, max_new_tokens=32, batch_size=5, metric="accuracy",
                          stage_tokens=4)
    with ScriptedWriting(model, tokenizer, texts) as whole:
        one_stage = generate(model, tokenizer, PROMPTS, max_new_tokens=32, batch_size=5, metric="accuracy",
                             stage_tokens=32)
    assert staged == one_stage
    assert whole.batch_sizes == [5] * 32  # one stage: every row to the cap, as transformers does
    # Stage 1 (4 steps): all five; rows leave as their lines end; "neutral" runs to the cap alone.
    assert device.batch_sizes[:4] == [5] * 4 and device.batch_sizes[4] < 5 and device.batch_sizes[-1] == 1
    assert sorted(device.batch_sizes, reverse=True) == device.batch_sizes and len(device.batch_sizes) == 32


def test_rows_left_in_the_batch_decode_as_they_would_in_the_whole_batch(model, tokenizer):
    """The real model's tokens (no filler): rows that hit EOS leave the batch with their rows
    of the KV cache; the rows left decode exactly as in one stage, where nothing leaves."""
    eos = tokenizer.eos_token_id
    texts = [[eos], [], [5, eos], []]  # the rows of PROMPTS 0 and 4 stop at once, of 2 after 2 tokens
    with ScriptedWriting(model, tokenizer, texts, filler=False) as device:
        staged = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=5, stage_tokens=1)
    with ScriptedWriting(model, tokenizer, texts, filler=False):
        one_stage = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=5, stage_tokens=12)
    assert staged == one_stage and staged[0] == staged[4] == ""
    assert device.batch_sizes[:3] == [5, 3, 2] and set(device.batch_sizes[3:]) == {2}
    assert len(device.batch_sizes) == 12  # the two rows left ran to the cap
    assert device.widths[1:] == [1] * 11  # each stage goes on from the cache: one new token per pass


def test_stage_tokens_must_be_positive(model, tokenizer):
    with pytest.raises(ValueError, match="stage_tokens must be at least 1"):
        generate(model, tokenizer, ["Hi"], 4, stage_tokens=0)


def test_evaluate_end_to_end_on_the_tiny_model(tmp_path, model, tokenizer):
    path = write_jsonl(tmp_path / "sentiment.jsonl", [
        {"prompt": "This movie was wonderful. Sentiment:", "completion": " positive"},
        {"prompt": "The food was cold. Sentiment:", "completion": " negative"},
    ] * 3)
    result = evaluate(model, tokenizer, path, "prompt-completion", "accuracy", max_samples=4, batch_size=3)
    assert result["metric"] == "accuracy" and result["samples"] == 4
    assert 0.0 <= result["value"] <= 1.0 and result["seconds"] >= 0 and result["maxNewTokens"] >= 4
    assert len(json.dumps(result)) < 4096  # goes into a termination message


# --- sandbox ----------------------------------------------------------------------------------

def run(code: str, tests: str | None = None, timeout_s: float = 5.0, memory_mb: int = 256):
    return run_python(code, timeout_s, memory_mb, tests=tests)


def test_sandbox_passes_a_correct_solution_and_fails_a_wrong_one():
    assert run("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5").passed
    wrong = run("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5")
    assert not wrong.passed and wrong.reason == "AssertionError"
    assert not run("raise ValueError('no')").passed


def test_sandbox_allows_the_standard_library_and_its_scratch_dir():
    code = ("import collections, dataclasses, heapq, itertools, json, math, re, statistics, tempfile, typing\n"
            "P = collections.namedtuple('P', 'x y')\n"
            "open('notes.txt', 'w').write('hi')\n"
            "assert open('notes.txt').read() == 'hi'\n"
            "with tempfile.TemporaryDirectory() as d:\n    pass\n")
    assert run(code).passed
    tests = ("import unittest\nclass T(unittest.TestCase):\n"
             "    def test_one(self):\n        self.assertEqual(one(), 1)\nunittest.main()\n")
    assert run("def one():\n    return 1\n", tests).passed  # unittest.main() ends with SystemExit(0)


def test_sandbox_stops_an_endless_loop_within_the_timeout():
    start = time.monotonic()
    result = run("while True:\n    pass\n", timeout_s=1.0)
    assert not result.passed and result.reason.startswith(("timeout", "killed by SIGXCPU"))
    assert time.monotonic() - start < 4.0


def test_sandbox_refuses_a_huge_allocation():
    result = run("b = bytearray(10 * 1024**3)\n", memory_mb=256)
    assert not result.passed and result.reason == "MemoryError"


def test_sandbox_cannot_write_or_delete_outside_its_scratch_dir(tmp_path):
    target, kept = tmp_path / "escaped.txt", tmp_path / "kept.txt"
    kept.write_text("keep me")
    result = run(f"open({str(target)!r}, 'w').write('x')\n")
    assert not result.passed and "PermissionError" in result.reason and not target.exists()
    assert not run(f"import os\nos.remove({str(kept)!r})\n").passed
    assert not run(f"import shutil\nshutil.copy('/etc/hostname', {str(target)!r})\n").passed
    assert not run("import os\nos.symlink('/', 'root')\n").passed
    assert kept.read_text() == "keep me" and not target.exists()


def test_sandbox_cannot_read_files_outside_the_standard_library(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    result = run(f"print(open({str(secret)!r}).read())\n")
    assert not result.passed and "reading" in result.reason


def test_sandbox_has_no_network():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        result = run(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n")
        assert not result.passed and "socket" in result.reason
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody connected
    assert not run("import socket\nsocket.getaddrinfo('localhost', 80)\n").passed


def test_sandbox_cannot_start_processes_or_load_c_libraries():
    result = run("import subprocess\nsubprocess.run(['true'])\n")
    assert not result.passed and "subprocess" in result.reason
    assert not run("import os\nos.system('true')\n").passed
    assert not run("import os\nos.fork()\n").passed
    assert not run("import ctypes\n").passed


def test_sandbox_does_not_count_an_early_exit_as_passing():
    assert not run("import sys\nsys.exit(0)\n", "assert False").passed
    assert not run("import os\nos._exit(0)\n", "assert False").passed


def test_sandbox_runs_in_a_scratch_dir_that_is_removed(tmp_path, monkeypatch):
    root = tmp_path / "sandboxes"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    code = (f"import os\nassert os.getcwd().startswith({str(root)!r})\n"
            "os.makedirs('a/b')\nopen('a/b/f.txt', 'w').write('x')\nos.chmod('a', 0o500)\n")
    assert run(code).passed
    assert not run(code + "while True:\n    pass\n", timeout_s=1.0).passed
    assert os.listdir(root) == []


# --- passAtOne --------------------------------------------------------------------------------

ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
CHAT_PROMPT = "<|user|>\nWrite add(a, b).</s>\n<|assistant|>\n"


def test_build_program_handles_continuations_fences_and_chat_answers():
    assert build_program("def add(a, b):\n", "    return a + b\n") == "def add(a, b):\n    return a + b\n"
    assert build_program("# add two numbers\n", "def add(a, b):\n    return a + b") == \
        "# add two numbers\ndef add(a, b):\n    return a + b"
    assert build_program("Write add.\n", "def add(a, b):\n    return a + b\n") == "def add(a, b):\n    return a + b\n"
    assert build_program(CHAT_PROMPT, "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.") == \
        "def add(a, b):\n    return a + b\n"
    assert build_program("Complete it:\n```python\ndef add(a, b):\n", "    return a + b\n```\nThat adds.") == \
        "def add(a, b):\n    return a + b\n"
    assert build_program("def add(a, b):\n", "    return a + b\n```\n") == "def add(a, b):\n    return a + b\n"


def test_pass_at_one_scores_the_exact_fraction_of_passing_programs():
    cases = [
        ("def add(a, b):\n", "    return a + b\n", True),
        ("def add(a, b):\n", "    return a - b\n", False),
        ("def add(a, b):\n", "    while True:\n        pass\n", False),
        (CHAT_PROMPT, "```python\ndef add(a, b):\n    return a + b\n```\nDone.", True),
        (CHAT_PROMPT, "import socket\nsocket.create_connection(('127.0.0.1', 9))\ndef add(a, b):\n    return a + b\n",
         False),
        (CHAT_PROMPT, "import sys\nsys.exit(0)\n", False),
        ("def add(a, b):\n", "    return a + b\nb = bytearray(10 * 1024**3)\n", False),
        ("Complete it:\n```python\ndef add(a, b):\n", "    return a + b\n```\nThat adds.", True),
    ]
    examples = [ex("    return a + b\n", prompt=p, tests=ADD_TESTS) for p, _, _ in cases]
    result = score("passAtOne", [pred for _, pred, _ in cases], examples, sandbox_timeout_s=1.0,
                   sandbox_memory_mb=256)
    assert (result["metric"], result["samples"], result["correct"]) == ("passAtOne", 8, 3)
    assert result["value"] == 3 / 8
    assert sum(result["failures"].values()) == 5 and result["failures"]["AssertionError"] == 1
