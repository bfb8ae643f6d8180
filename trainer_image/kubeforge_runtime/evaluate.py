"""Held-out task metrics by greedy generation: does the model give the right answers?

Perplexity says how well a model predicts text; a task metric says whether it answers.
Callers: the FineTuneJob trainer (before and after training, to report the gain), the
QuantizeJob runner (input model vs quantized output, to report the loss) and the
benchmarks. Each calls :func:`evaluate` (or the steps: :func:`load_examples`,
:func:`generate`, :func:`score`) and puts the small result dict into its status/report.

Data: ``prompt-completion`` records (the prompt is continued, the completion is the
reference) or ``chat`` records (the messages before the last assistant message, rendered
with the tokenizer's chat template and its generation prompt, are the prompt; that
message's content is the reference). ``text`` records have no answers and are refused.

Metrics (``value`` in [0, 1]; predictions are compared on their first non-empty line,
because a model that does not stop keeps talking after its answer):

* ``accuracy`` - classification. First line of the prediction and the reference are
  normalised (strip, casefold, trailing punctuation removed, inner whitespace collapsed) and
  must be equal. Equality, not containment: a model that always says one label scores
  exactly the label's share (chance on a balanced set), and one that lists every label
  scores nothing. ``perLabel`` gives the accuracy per reference label (up to 8 labels).
* ``exactMatch`` - SQuAD: lowercase, punctuation removed, articles (a/an/the) removed,
  whitespace collapsed; first line of the prediction equals the reference.
* ``f1`` - SQuAD token F1 between the same normalisations, averaged over samples.
* ``passAtOne`` - one greedy sample per problem; the program (:func:`build_program`) then
  the record's ``tests`` run in :mod:`kubeforge_runtime.sandbox`; a sample passes iff the
  tests run to their end with exit status 0 within the time and memory limits. The program:
  if the answer holds a code fence, the code before it (a continuation closing the
  prompt's open fence) or else the first fenced block; then ``prompt + answer`` if that
  compiles (the HumanEval shape: the prompt is a signature or comment, the model writes
  the body; a prompt ending in an open fence contributes the code after the fence), else
  the answer alone (chat answers, prose prompts). ``failures`` counts the top reasons.

Generation stops per row as soon as the row holds everything its metric reads
(:func:`answer_end`): the first non-empty line for the line metrics; for ``passAtOne``, the
code up to where a program ends in HumanEval's convention (after a body has started, a
top-level comment, ``if __name__``, ``print(``, ``assert`` or a closing code fence), where
the answer is cut. A base model that does not stop otherwise decodes to the token cap on every
prompt, and that cost is paid in every training and quantization job that evaluates.
"""

from __future__ import annotations

import collections
import logging
import re
import string
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import MAX_REPORTED, DataError, load_records
from .sandbox import SandboxResult, run_python

__all__ = ["METRICS", "EvalExample", "SandboxResult", "answer_end", "build_program", "evaluate", "generate",
           "load_examples",
           "max_new_tokens_for", "run_python", "score", "validate_examples"]

log = logging.getLogger(__name__)

METRICS = ("accuracy", "exactMatch", "f1", "passAtOne")
FORMATS = ("prompt-completion", "chat")
SANDBOX_WORKERS = 4
"""passAtOne programs run this many at a time (they mostly wait on their child process)."""


@dataclass
class EvalExample:
    prompt: str
    """The text the model continues (chat: rendered with the generation prompt)."""
    reference: str
    """The expected answer: the completion, or the last assistant message's content."""
    tests: str | None = None
    """Python test code for passAtOne (record key "tests")."""
    source: str = ""
    """Where the record came from, as file:line (for error messages)."""


# --- data -------------------------------------------------------------------------------------

def load_examples(path: str | Path, fmt: str, tokenizer: Any, max_samples: int | None = None, *,
                  metric: str | None = None) -> list[EvalExample]:
    """The first ``max_samples`` records of ``path`` as examples; :class:`DataError` naming
    file:line of bad records. With ``metric``, also :func:`validate_examples`."""
    if fmt == "text":
        raise DataError(f"{path}: a task metric needs prompts and answers, which format text does not have; "
                        "use prompt-completion or chat records")
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r} for a task metric; use one of {FORMATS}")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("dataset format chat needs a tokenizer with a chat template (chat_template)")
    records = load_records(path, fmt)[:max_samples]
    examples, errors = [], []
    for r in records:
        where = f"{r.file}:{r.line}"
        tests = r.data.get("tests") if isinstance(r.data.get("tests"), str) else None
        if fmt == "prompt-completion":
            examples.append(EvalExample(r.data["prompt"], r.data["completion"], tests, where))
            continue
        msgs = r.data["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        if last == 0:
            errors.append(f"{where}: no message before the last assistant message to prompt with")
        elif not msgs[last]["content"].strip():
            errors.append(f"{where}: the last assistant message (the reference answer) is empty")
        else:
            prompt = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
            examples.append(EvalExample(prompt, msgs[last]["content"], tests, where))
    _raise_if(errors, f"in {path} (format {fmt})")
    if metric is not None:
        validate_examples(examples, metric)
    return examples


def validate_examples(examples: list[EvalExample], metric: str) -> None:
    """Check that ``examples`` can be scored with ``metric`` (passAtOne needs "tests")."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
    if metric == "passAtOne":
        _raise_if([f"{e.source or '?'}: passAtOne needs a string \"tests\" field (Python test code)"
                   for e in examples if not (e.tests and e.tests.strip())], "for metric passAtOne")


def _raise_if(errors: list[str], where: str) -> None:
    if errors:
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise DataError(f"{len(errors)} bad record(s) {where}:\n  " + "\n  ".join(errors[:MAX_REPORTED]) + more)


# --- generation -------------------------------------------------------------------------------

def answer_end(metric: str, text: str) -> int | None:
    """Where the part of ``text`` that :func:`score` reads for ``metric`` ends, once it is
    complete (None while more tokens could still change the score)."""
    if metric != "passAtOne":
        line = re.search(r"\S[^\n]*\n", text)  # the first non-empty line, ended
        return line.end() if line else None
    body = re.search(r"\n[ \t]+\S", text)  # a program ends only after a body has started
    end = _PROGRAM_END.search(text, body.start()) if body else None
    return end.start() if end else None


_PROGRAM_END = re.compile(r"\n(?:#|if __name__|print\(|assert\b|```)")
"""Top-level lines that end a generated program (HumanEval's stop sequences; ``def`` and
``class`` are not among them here, because this answer may write its own helpers)."""


STAGE_TOKENS = 8
"""Rows are decoded in stages of this many tokens; between stages the finished rows leave
the batch (with their rows of the KV cache). transformers' ``generate`` keeps a finished row
in the batch, padding it, until every row is done: a batch where a few answers run to the
token cap cost every row that cap. Each stage is one ``generate`` call continuing from the
cache the last one returned, so only the decoding loop's length changes, not its rules."""


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 16, *,
             add_special_tokens: bool = True, metric: str | None = None,
             stage_tokens: int = STAGE_TOKENS) -> list[str]:
    """Greedy continuations of ``prompts`` (new tokens only, special tokens skipped, cut at
    EOS), batched with left padding. Pass ``add_special_tokens=False`` for prompts rendered
    by a chat template (they already hold their BOS). With ``metric``, each row stops once
    :func:`answer_end` finds its answer complete, and is cut there. A finished row leaves
    the batch at the end of its stage (``stage_tokens``, see :data:`STAGE_TOKENS`)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    if not prompts:
        return []
    if stage_tokens < 1:
        raise ValueError(f"stage_tokens must be at least 1, not {stage_tokens}")
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos[0]
    ids = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] or [fallback] for p in prompts]
    # Batch prompts of similar length together (less padding), answer in the input order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    out = [""] * len(prompts)
    was_training = model.training
    model.eval()  # dropout off: greedy results must not depend on the caller's mode
    try:
        # no_grad, not inference_mode: the trainer keeps training this model afterwards, and
        # tensors created under inference_mode (e.g. cached rotary tables) cannot enter autograd.
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                rows = [torch.tensor(ids[i], dtype=torch.long) for i in batch]
                # Left padding here rather than by the tokenizer: its padding_side stays as
                # it is, and the new tokens of every row start at column `width`.
                input_ids = pad_sequence(rows, batch_first=True, padding_value=pad, padding_side="left")
                mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")
                for i, new in _decode_in_stages(model, tokenizer, input_ids.to(device), mask.to(device), batch,
                                                max_new_tokens, stage_tokens, pad, eos, metric):
                    text = tokenizer.decode(new, skip_special_tokens=True)
                    end = answer_end(metric, text) if metric == "passAtOne" else None
                    out[i] = text if end is None else text[:end]
    finally:
        model.train(was_training)
    return out


def _decode_in_stages(model: Any, tokenizer: Any, input_ids: Any, mask: Any, keys: list[int], max_new_tokens: int,
                      stage_tokens: int, pad: int, eos: list[int], metric: str | None) -> Any:
    """Yield (key, new token ids cut before EOS) for every row of a left-padded batch, each
    as soon as the stage it finished in ends; the unfinished rows go on with their cache."""
    import torch

    width = input_ids.shape[1]
    stop = {} if metric is None else {"stopping_criteria": _answers_complete(tokenizer, width, metric)}
    cache = None
    while True:
        budget = min(stage_tokens, max_new_tokens - (input_ids.shape[1] - width))
        result = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                                num_beams=1, pad_token_id=pad, eos_token_id=eos, cache=cache,
                                return_dict_in_generate=True, **stop)
        sequences = result.sequences if hasattr(result, "sequences") else result
        cache = getattr(result, "cache", None)  # None: the next stage reads the whole sequence again
        at_cap = sequences.shape[1] - width >= max_new_tokens
        # A stage shorter than its budget means every row stopped (transformers ends the loop then).
        all_stopped = sequences.shape[1] - input_ids.shape[1] < budget
        going = []
        for row, key in enumerate(keys):
            new = sequences[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in eos), None)
            done = at_cap or all_stopped or cut is not None or (
                metric is not None and answer_end(metric, tokenizer.decode(new, skip_special_tokens=True)) is not None)
            if done:
                yield key, new[:cut]
            else:
                going.append(row)
        if not going:
            return
        grown = sequences.shape[1] - input_ids.shape[1]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], grown)], dim=1)
        if len(going) < len(keys):
            index = torch.tensor(going, device=sequences.device)
            sequences, mask = sequences[index], mask[index]
            if cache is not None:
                cache.batch_select_indices(index)
            keys = [keys[r] for r in going]
        input_ids = sequences


def _answers_complete(tokenizer: Any, width: int, metric: str) -> Any:
    """A transformers stopping criterion: per row, True once :func:`answer_end` finds the
    answer complete (transformers then pads that row, and stops when every row is done)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AnswersComplete(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
            texts = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            return torch.tensor([answer_end(metric, t) is not None for t in texts], device=input_ids.device)

    return StoppingCriteriaList([AnswersComplete()])


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The model's end-of-sequence ids (chat models often end turns with their own) and the tokenizer's."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = config_eos if isinstance(config_eos, list) else [config_eos]
    ids = [i for i in [*ids, tokenizer.eos_token_id] if i is not None]
    if not ids:
        raise ValueError("the tokenizer and the model define no EOS token; generation could not stop")
    return list(dict.fromkeys(ids))


def max_new_tokens_for(tokenizer: Any, examples: list[EvalExample], metric: str) -> int:
    """How many tokens to generate per prompt, from the longest reference."""
    longest = max((len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples), default=0)
    # A batch decodes until every row has stopped or hit this cap, so the cap sets the cost
    # of an evaluation that runs inside every training and quantization job. A right answer
    # is about as long as the reference; the margin leaves room for a leading newline, a
    # different phrasing and the EOS. The other metrics read the first line only, so tokens
    # far past the reference's length would be paid for and thrown away. Code varies more
    # (another correct solution may be twice as long, or fenced), so passAtOne gets more.
    if metric == "passAtOne":
        budget = 2 * longest + 32
    else:
        budget = longest + max(4, longest // 4)
    # At least 4 (a one-token label plus a newline/space and EOS), at most 256 (cost bound).
    return max(4, min(256, budget))


# --- scoring ----------------------------------------------------------------------------------

def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _normalize_label(text: str) -> str:
    s = " ".join(text.split()).casefold()
    while s and (unicodedata.category(s[-1]).startswith("P") or s[-1].isspace()):
        s = s[:-1]
    return s


_PUNCT = set(string.punctuation)


def _normalize_squad(text: str) -> str:
    """The SQuAD v1.1 evaluation script's normalize_answer."""
    s = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: str, reference: str) -> float:
    pred, ref = _normalize_squad(prediction).split(), _normalize_squad(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _fences(lines: list[str]) -> list[int]:
    return [k for k, line in enumerate(lines) if line.lstrip().startswith("```")]


def build_program(prompt: str, prediction: str) -> str:
    """The Python program that passAtOne runs for one answer (see the module docstring)."""
    lines, prompt_lines = prediction.splitlines(keepends=True), prompt.splitlines(keepends=True)
    fences, prompt_fences = _fences(lines), _fences(prompt_lines)
    answers = [prediction]
    if fences:
        head = "".join(lines[:fences[0]])
        block = "".join(lines[fences[0] + 1:fences[1] if len(fences) > 1 else None])
        # Code before the first fence: a continuation closing the prompt's open fence;
        # prose (or nothing) before it: the answer is the block that fence opens.
        answers = [head, block] if head.strip() else [block]
    if len(prompt_fences) % 2:  # the prompt opens a code block: its code follows the fence
        prompt = "".join(prompt_lines[prompt_fences[-1] + 1:])
    for answer in answers:
        for program in (prompt + answer, answer):
            if program.strip() and _compiles(program):
                return program
    return answers[-1]


def _compiles(source: str) -> bool:
    try:
        compile(source, "<program>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def score(metric: str, predictions: list[str], examples: list[EvalExample], *, sandbox_timeout_s: float = 5.0,
          sandbox_memory_mb: int = 512) -> dict[str, Any]:
    """``{"metric", "value" (0..1), "samples", "correct"}`` plus small per-metric details."""
    validate_examples(examples, metric)
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    n = len(examples)
    result: dict[str, Any] = {"metric": metric, "value": 0.0, "samples": n}
    if metric == "f1":
        result["value"] = sum(_f1(_first_line(p), e.reference) for p, e in zip(predictions, examples)) / max(n, 1)
        return result
    if metric == "accuracy":
        refs = [_normalize_label(e.reference) for e in examples]
        hits = [_normalize_label(_first_line(p)) == r for p, r in zip(predictions, refs)]
        labels = collections.Counter(refs)
        if len(labels) <= 8:
            result["perLabel"] = {lab[:40]: sum(h for h, r in zip(hits, refs) if r == lab) / count
                                  for lab, count in labels.items()}
    elif metric == "exactMatch":
        hits = [_normalize_squad(_first_line(p)) == _normalize_squad(e.reference)
                for p, e in zip(predictions, examples)]
    else:  # passAtOne
        def run(pe: tuple[str, EvalExample]) -> SandboxResult:
            return run_python(build_program(pe[1].prompt, pe[0]), sandbox_timeout_s, sandbox_memory_mb,
                              tests=pe[1].tests)

        with ThreadPoolExecutor(max_workers=SANDBOX_WORKERS) as pool:
            runs = list(pool.map(run, zip(predictions, examples)))
        hits = [r.passed for r in runs]
        reasons = collections.Counter(r.reason.split(":")[0][:60] for r in runs if not r.passed)
        result["failures"] = dict(reasons.most_common(5))
    result["correct"] = sum(hits)
    result["value"] = sum(hits) / n if n else 0.0
    return result


def evaluate(model: Any, tokenizer: Any, path: str | Path, fmt: str, metric: str, max_samples: int | None = None,
             batch_size: int = 32, *, sandbox_timeout_s: float = 5.0, sandbox_memory_mb: int = 512) -> dict[str, Any]:
    """Load, generate, score; the result of :func:`score` plus ``maxNewTokens`` and ``seconds``."""
    start = time.perf_counter()
    examples = load_examples(path, fmt, tokenizer, max_samples, metric=metric)
    new_tokens = max_new_tokens_for(tokenizer, examples, metric)
    predictions = generate(model, tokenizer, [e.prompt for e in examples], new_tokens, batch_size,
                           add_special_tokens=fmt != "chat", metric=metric)
    result = score(metric, predictions, examples, sandbox_timeout_s=sandbox_timeout_s,
                   sandbox_memory_mb=sandbox_memory_mb)
    result["maxNewTokens"] = new_tokens
    result["seconds"] = round(time.perf_counter() - start, 3)
    log.info("%s on %s: %.4f over %d samples in %.1fs", metric, path, result["value"], result["samples"],
             result["seconds"])
    return result
