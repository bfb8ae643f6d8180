"""The data pipeline: formats, loss masks, packing, bad records, sharding, the dataset check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import DATA, REPO, child_env

from kubeforge_runtime import data as D


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    from kubeforge_runtime.models import load_tokenizer

    return load_tokenizer(tiny_model)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_completion_trains_on_the_completion_only(tok) -> None:
    ids, labels = D.tokenize_record(tok, {"prompt": "Review: great.\nSentiment:", "completion": " positive"}, "prompt-completion")
    n_prompt = len(tok("Review: great.\nSentiment:")["input_ids"])
    assert labels[:n_prompt] == [D.IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:], skip_special_tokens=True) == " positive"


def test_chat_trains_on_assistant_turns_only(tok) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
            {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And Chile?"},
            {"role": "assistant", "content": "Santiago."}]
    ids, labels = D.tokenize_record(tok, {"messages": msgs}, "chat")
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != D.IGNORE_INDEX])
    assert "Lima." in trained and "Santiago." in trained
    for other in ("Be brief", "Capital of Peru", "And Chile", "<|user|>"):
        assert other not in trained


def test_text_trains_on_everything_and_ends_with_eos(tok) -> None:
    ids, labels = D.tokenize_record(tok, {"text": "hello world"}, "text")
    assert ids == labels and ids[-1] == tok.eos_token_id


def test_packing_shifts_labels_and_fills_every_position(tok) -> None:
    pairs = [D.tokenize_record(tok, {"text": f"Counting: {i} {i + 1} {i + 2}."}, "text") for i in range(20)]
    stream = [t for ids, _ in pairs for t in ids]
    starts = {sum(len(ids) for ids, _ in pairs[:i]) for i in range(len(pairs))}  # stream index of each record start
    x, y, pos = D.build_samples(pairs, 16, packing=True, pad_id=0)
    assert x.shape == y.shape == pos.shape and x.shape[1] == 16 and x.shape[0] == (len(stream) - 1) // 16
    assert x.flatten().tolist() == stream[: x.numel()]
    # Targets are the next token, except a record's first token (nothing of its record precedes it).
    expected = [D.IGNORE_INDEX if i in starts else stream[i] for i in range(1, x.numel() + 1)]
    assert y.flatten().tolist() == expected
    # Positions restart at every record start and count up inside a record.
    flat = pos.flatten().tolist()
    for i in range(x.numel()):
        assert flat[i] == (0 if i in starts else flat[i - 1] + 1 if i % 16 else flat[i])


def test_packed_records_do_not_attend_to_each_other(tok, tiny_model) -> None:
    """The second record of a packed sample gets the logits it gets alone."""
    import torch

    from kubeforge_runtime import models
    from kubeforge_runtime.train.parallelize import CausalLMStage

    a = D.tokenize_record(tok, {"text": "The first record talks about apples."}, "text")
    b = D.tokenize_record(tok, {"text": "A second one, about pears."}, "text")
    s = len(a[0]) + len(b[0]) - 1
    x, _, pos = D.build_samples([a, b, a], s, packing=True, pad_id=0)
    lm = models.load_causal_lm(tiny_model).eval()
    stage = CausalLMStage(lm, True, True)
    with torch.no_grad():
        packed = stage(x[:1], pos[:1])[0, len(a[0]):]
        alone = stage(torch.tensor([b[0][: s - len(a[0])]]))[0]
        unmasked = stage(x[:1])[0, len(a[0]):]  # plain positions: attends to the first record
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-3)


def test_padding_without_packing_masks_pad_and_prompt(tok) -> None:
    pair = D.tokenize_record(tok, {"prompt": "Q: 2+2?", "completion": " 4"}, "prompt-completion")
    x, y, pos = D.build_samples([pair], 32, packing=False, pad_id=tok.pad_token_id)
    assert pos[0].tolist() == list(range(32))  # plain positions: attention keeps its causal fast path
    n = len(pair[0])
    assert x[0, n:].eq(tok.pad_token_id).all() and y[0, n - 1:].eq(D.IGNORE_INDEX).all()
    assert y[0, : n - 1].tolist() == pair[1][1:]


def test_bad_records_are_reported_with_file_and_line(tmp_path: Path) -> None:
    f = write(tmp_path / "bad.jsonl", ['{"prompt": "a", "completion": "b"}', "{not json", "",
                                       '{"prompt": "a"}', '["x"]', '{"prompt": "a", "completion": ""}'])
    with pytest.raises(D.DataError) as err:
        D.load_records(f, "prompt-completion")
    msg = str(err.value)
    assert "4 bad record(s)" in msg
    for line in (2, 4, 5, 6):
        assert f"{f}:{line}:" in msg
    assert f"{f}:1:" not in msg
    chat = write(tmp_path / "chat.jsonl", ['{"messages": [{"role": "user", "content": "hi"}]}'])
    with pytest.raises(D.DataError, match=r"chat.jsonl:1: no assistant message"):
        D.load_records(chat, "chat")


def test_validation_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    recs = D.load_records(DATA / "text.jsonl", "text")  # templated: many exact duplicates
    a_train, a_val = D.split_records(recs, 0.1, seed=7)
    b_train, b_val = D.split_records(recs, 0.1, seed=7)
    assert [r.line for r in a_val] == [r.line for r in b_val] and a_val
    assert {r.line for r in a_train}.isdisjoint({r.line for r in a_val})
    assert len(a_train) + len(a_val) == len(recs)
    # No validation record is also a training record: every copy went to the same side.
    train_keys, val_keys = {D.normalized_key(r.data) for r in a_train}, {D.normalized_key(r.data) for r in a_val}
    assert train_keys.isdisjoint(val_keys)
    assert len(val_keys) == round(len(train_keys | val_keys) * 0.1)  # a tenth of the distinct records


def test_split_keeps_whitespace_variants_together() -> None:
    recs = [D.Record({"prompt": f"Review: item {i % 25}.", "completion": " positive"}, "f", i) for i in range(100)]
    for r in recs[::3]:  # the same records with different whitespace
        r.data = {"prompt": "  " + r.data["prompt"].replace(" ", "   ") + "\n", "completion": " positive "}
    for seed in range(5):
        train, val = D.split_records(recs, 0.2, seed)
        assert val and {D.normalized_key(r.data) for r in train}.isdisjoint({D.normalized_key(r.data) for r in val})
        assert len({D.normalized_key(r.data) for r in val}) == 5
    # Without duplicates the split is the plain seeded draw it always was.
    clean = [D.Record({"text": f"record {i}"}, "f", i) for i in range(50)]
    import torch

    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    assert sorted(r.line for r in D.split_records(clean, 0.1, 3)[1]) == sorted(perm[:5])
    same = [D.Record({"text": "one"}, "f", i) for i in range(4)]
    assert D.split_records(same, 0.5, 0) == (same, [])  # nothing distinct to hold out


def test_normalized_key_and_remove_overlap() -> None:
    key = D.normalized_key
    assert key({"text": "a  b\n"}) == key({"text": " a b"}) != key({"text": "ab"})
    # Only what the record trains on counts: extra keys ("id", "tests") do not.
    assert key({"prompt": "p", "completion": " c", "tests": "assert 1"}) == key({"prompt": "p ", "completion": "c"})
    chat = {"messages": [{"role": "user", "content": "Capital of  Peru?"}, {"role": "assistant", "content": "Lima"}]}
    assert key(chat) == key({"messages": [{"role": "user", "content": "Capital of Peru?"},
                                          {"role": "assistant", "content": "Lima "}], "id": 7})
    train = [D.Record({"text": t}, "t", i) for i, t in enumerate(["a", "b", "b", "c  d", "e"])]
    held = [D.Record({"text": t}, "h", i) for i, t in enumerate(["b", "c d", "z"])]
    kept, dropped = D.remove_overlap(train, held)
    assert [r.data["text"] for r in kept] == ["a", "e"] and dropped == 3
    assert D.remove_overlap(train, []) == (train, 0)


def test_sampler_shards_and_resumes_deterministically() -> None:
    s = D.GlobalBatchSampler(num_samples=50, global_batch_size=8, seed=3)
    assert s.steps_per_epoch == 6
    for step in range(14):  # crosses two epoch boundaries
        batch = s.global_batch(step)
        assert len(batch) == 8 and len(set(batch)) == 8
        for dp in (1, 2, 4):
            shards = [s.rank_batch(step, r, dp) for r in range(dp)]
            assert [i for sh in shards for i in sh] == batch
    epoch0 = [i for st in range(6) for i in s.global_batch(st)]
    assert len(set(epoch0)) == 48  # no sample twice in an epoch
    assert s.global_batch(6) != s.global_batch(0)  # a new permutation per epoch
    other = D.GlobalBatchSampler(50, 8, 3)
    other.load_state_dict({"step": 5, "num_samples": 50})
    assert next(iter(other)) == s.global_batch(5)
    with pytest.raises(D.DataError, match="globalBatchSize"):
        D.GlobalBatchSampler(4, 8, 0)


def test_prepare_is_identical_across_calls(tok) -> None:
    a = D.prepare(tok, DATA / "chat.jsonl", "chat", 64, True, validation_split=0.1, seed=1)
    b = D.prepare(tok, DATA / "chat.jsonl", "chat", 64, True, validation_split=0.1, seed=1)
    assert a.train_inputs.equal(b.train_inputs) and a.val_labels.equal(b.val_labels)
    assert a.num_val_records == b.num_val_records > 0 and a.num_train_records + a.num_val_records == 300
    assert a.dropped_overlap == 0 and a.digest == D.file_digest(DATA / "chat.jsonl")


def test_prepare_drops_training_records_found_in_held_out_files(tok, tmp_path: Path, caplog) -> None:
    rows = [{"prompt": f"Review: thing {i}.\nSentiment:", "completion": " positive" if i % 2 else " negative"}
            for i in range(40)]
    train = write(tmp_path / "train.jsonl", [json.dumps(r) for r in rows])
    evalset = write(tmp_path / "eval.jsonl", [
        json.dumps(rows[3]),
        json.dumps({"prompt": "Review:  thing 5.\nSentiment: ", "completion": " positive", "tests": "x"}),
        json.dumps({"prompt": "Review: never trained on.\nSentiment:", "completion": " negative"}),
    ])
    val = write(tmp_path / "val.jsonl", [json.dumps(rows[7]), json.dumps(rows[8])])
    with caplog.at_level("WARNING", logger=D.__name__):
        data = D.prepare(tok, train, "prompt-completion", 32, False, validation_path=val, exclude_paths=[evalset])
    assert data.dropped_overlap == 4 and data.num_train_records == 36 and data.num_val_records == 2
    assert "dropped 2 training record(s)" in caplog.text and str(evalset) in caplog.text
    assert data.digest == D.file_digest(train, val, evalset)
    plain = D.prepare(tok, train, "prompt-completion", 32, False, validation_split=0.25, seed=0,
                      exclude_paths=[evalset])
    assert plain.dropped_overlap == 2 and plain.num_train_records + plain.num_val_records == 38
    with pytest.raises(D.DataError, match="no training records left"):
        D.prepare(tok, train, "prompt-completion", 32, False, exclude_paths=[train])


def test_check_summarises_and_finds_label_balance(tok, tmp_path: Path) -> None:
    s = D.check(DATA / "prompt_completion.jsonl", None, tok)
    assert s["format"] == "prompt-completion" and s["records"] == 300 and s["badRecords"] == 0
    assert s["labels"]["classes"] == 2 and set(s["labels"]["counts"]) == {"positive", "negative"}
    assert s["duplicates"] > 0 and s["tokens"]["total"] > s["trainedTokens"] > 0
    f = write(tmp_path / "d.jsonl", ['{"text": "a b"}', '{"text": "a b"}', '{"text": "c"}', "oops",
                                     '{"text": " a  b"}'])
    s2 = D.check(f)
    assert s2["duplicates"] == 2 and s2["badRecords"] == 1 and "labels" not in s2
    assert s2["errors"] == [f"{f}:4: invalid JSON (Expecting value at column 1)"]


def test_check_command_line(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "kubeforge_runtime.data", "check", str(DATA / "prompt_completion.jsonl"),
                         "--json"], capture_output=True, text=True, env=child_env(), timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["labels"]["classes"] == 2
    bad = write(tmp_path / "bad.jsonl", ['{"text": "fine"}', '{"text": 3}'])
    res = subprocess.run([sys.executable, "-m", "kubeforge_runtime.data", "check", str(bad)],
                         capture_output=True, text=True, env=child_env(), timeout=120)
    assert res.returncode == 1 and f"{bad}:2:" in res.stdout


STARTERS = REPO / "examples" / "volumes" / "data"


@pytest.mark.parametrize("name", ["text-classification", "question-answering", "code-generation"])
def test_starter_sets_have_disjoint_duplicate_free_splits(name: str) -> None:
    """The shipped starters: the test file is held out from the training file, after
    normalisation and by prompt, and neither file repeats a record."""
    parsed, fmt = D.parse_jsonl(STARTERS / f"{name}.jsonl", None)
    assert not parsed.errors
    train = parsed.records
    test = D.load_records(STARTERS / f"{name}-test.jsonl", fmt)
    for recs in (train, test):
        keys = [D.normalized_key(r.data) for r in recs]
        assert len(set(keys)) == len(keys)
    assert D.remove_overlap(train, test)[1] == 0

    def prompt(d: dict) -> str:
        if fmt == "chat":
            return " ".join(" ".join(m["content"].split()) for m in d["messages"] if m["role"] != "assistant")
        return " ".join(d["prompt"].split())

    assert {prompt(r.data) for r in train}.isdisjoint({prompt(r.data) for r in test})
    if name == "text-classification":
        labels = [r.data["completion"] for r in test]
        assert labels.count(" positive") == labels.count(" negative") == len(labels) // 2
    if name == "code-generation":
        for r in train + test:  # our own code: each completion passes its own tests
            exec(compile(r.data["prompt"] + r.data["completion"] + r.data["tests"], r.file, "exec"), {})


def test_a_step_drops_the_columns_after_the_last_target_and_no_loss_or_gradient_changes(tok, tiny_model: Path):
    """Trainer._trim: right padding of short records costs no compute. The real model's loss
    and every gradient are those of the full-width batch (causal attention)."""
    import torch

    from kubeforge_runtime.models import load_causal_lm

    records = [{"prompt": "Review: great.\nSentiment:", "completion": " positive"},
               {"prompt": "Review: the phone froze every hour and the refund never came.\nSentiment:",
                "completion": " negative"}]
    pairs = [D.tokenize_record(tok, r, "prompt-completion") for r in records]
    x, y, pos = D.build_samples(pairs, 64, packing=False, pad_id=tok.pad_token_id)
    width = D.target_span(y)
    assert width == max(len(ids) for ids, _ in pairs) - 1 < 64  # the longer record's last target
    assert (y[:, width:] == D.IGNORE_INDEX).all() and (y[:, width - 1] != D.IGNORE_INDEX).any()
    assert D.target_span(torch.full((2, 8), D.IGNORE_INDEX)) == 1  # no target at all: one column

    model = load_causal_lm(tiny_model, dtype=torch.float32)
    model.train()

    def loss_and_grads(cols: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = model(input_ids=x[:, :cols], position_ids=pos[:, :cols]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, :cols].flatten(),
                                                 ignore_index=D.IGNORE_INDEX, reduction="sum")
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full_loss, full_grads = loss_and_grads(64)
    cut_loss, cut_grads = loss_and_grads(width)
    torch.testing.assert_close(cut_loss, full_loss, rtol=1e-5, atol=1e-5)
    assert len(cut_grads) == len(full_grads) > 0
    for a, b in zip(cut_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
