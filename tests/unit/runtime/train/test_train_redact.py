"""dataset.redact in the training pipeline: what the trainer sees, the source file, the counts.

No torchrun: ``data.prepare`` is what every rank calls, ``launch.preflight`` what the pod
runs first, and ``output.lineage_record`` what the trainer writes next to the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import merge

from kubeforge_runtime import data as D
from kubeforge_runtime import pii

CARD = "4111 1111 1111 1111"
CN_ID = "11010519491231002X"
RECORDS = [
    {"prompt": f"Customer {i} wrote from ops{i}@example.com, phone 138{i:08d}.", "completion": f" Ticket {i} closed."}
    for i in range(12)
] + [
    {"prompt": "Refund for the card below.", "completion": f" Refunded to {CARD}; id {CN_ID}; host 10.0.0.{i}."}
    for i in range(1, 5)
] + [
    # Hard negatives stay as they are: a version, a date, a 16-digit number failing Luhn.
    {"prompt": "Release notes", "completion": " version 1.2.3.4 shipped 2024-11-15, batch 4111111111111112."},
]


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    from kubeforge_runtime.models import load_tokenizer

    return load_tokenizer(tiny_model)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def by_hand(row: dict[str, Any]) -> dict[str, Any]:
    """What redaction must produce, written out independently of the detector."""
    out = {}
    for key, text in row.items():
        for value, placeholder in ((CARD, "<CREDIT_CARD>"), (CN_ID, "<ID_NUMBER>")):
            text = text.replace(value, placeholder)
        for i in range(12):
            text = text.replace(f"ops{i}@example.com", "<EMAIL>").replace(f"138{i:08d}", "<PHONE>")
        for i in range(1, 5):
            text = text.replace(f"10.0.0.{i}.", "<IP_ADDRESS>.")
        out[key] = text
    return out


def test_prepare_trains_on_placeholders_and_leaves_the_source_file_unchanged(tok, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    redacted = D.prepare(tok, src, "prompt-completion", 48, False, validation_split=0.2, seed=3,
                         redact=pii.ALL_KINDS)
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before, "the source file must never be written"
    assert hashlib.sha256(src.read_bytes()).hexdigest() == hashlib.sha256(before[0]).hexdigest()
    assert redacted.digest == D.file_digest(src), "the lineage digest is the source file's, as written"

    # The tensors equal those of a file redacted by hand: the trainer saw placeholders only.
    expected = D.prepare(tok, write_jsonl(tmp_path / "by-hand.jsonl", [by_hand(r) for r in RECORDS]),
                         "prompt-completion", 48, False, validation_split=0.2, seed=3)
    for name in ("train_inputs", "train_labels", "val_inputs", "val_labels"):
        assert torch.equal(getattr(redacted, name), getattr(expected, name)), name
    assert redacted.redactions == {"email": 12, "phone": 12, "ipAddress": 4, "creditCard": 4, "idNumber": 4}

    plain = D.prepare(tok, src, "prompt-completion", 48, False, validation_split=0.2, seed=3)
    assert plain.redactions == {} and not torch.equal(plain.train_inputs, redacted.train_inputs)


def test_records_differing_only_in_personal_data_are_the_same_record_for_held_out_checks(tok, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    evalset = write_jsonl(tmp_path / "eval.jsonl", [
        {"prompt": "Customer 99 wrote from someone@example.org, phone 13999999999.", "completion": " Ticket 5 closed."}])
    kept = D.prepare(tok, train, "prompt-completion", 48, False, validation_split=0.0, exclude_paths=[evalset],
                     redact=["email", "phone"])
    # "Customer 5 ..." differs from the eval record in its number only; with the email and the
    # phone number redacted the rest differs ("Customer 5" vs "Customer 99"), so it stays:
    assert kept.dropped_overlap == 0
    evalset = write_jsonl(tmp_path / "eval.jsonl", [
        {"prompt": "Customer 5 wrote from someone@example.org, phone 13999999999.", "completion": " Ticket 5 closed."}])
    dropped = D.prepare(tok, train, "prompt-completion", 48, False, validation_split=0.0, exclude_paths=[evalset],
                        redact=["email", "phone"])
    assert dropped.dropped_overlap == 1 and dropped.num_train_records == len(RECORDS) - 1
    assert dropped.redactions == {"email": 11, "phone": 11}, "counted over the records trained on"
    raw = D.prepare(tok, train, "prompt-completion", 48, False, validation_split=0.0, exclude_paths=[evalset])
    assert raw.dropped_overlap == 0


def test_only_the_asked_kinds_are_counted_and_replaced(tok, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = D.prepare(tok, src, "prompt-completion", 48, False, validation_split=0.0, redact=["creditCard", "email"])
    assert out.redactions == {"creditCard": 4, "email": 12}


def test_chat_records_are_redacted_in_every_message_and_the_input_is_not_modified() -> None:
    record = {"messages": [{"role": "system", "content": "Support desk."},
                           {"role": "user", "content": "My card is 5555-5555-5555-4444, call +44 20 7946 0958"},
                           {"role": "assistant", "content": "Noted; we will write to you at a.b@example.org."}],
              "id": "ticket-13800000000"}
    original = json.loads(json.dumps(record))
    out, counts = D.redact_record(record, pii.ALL_KINDS)
    assert record == original
    assert [m["content"] for m in out["messages"]] == [
        "Support desk.", "My card is <CREDIT_CARD>, call <PHONE>", "Noted; we will write to you at <EMAIL>."]
    assert out["id"] == "ticket-13800000000", "keys the model does not train on are left alone"
    assert counts == {"creditCard": 1, "phone": 1, "email": 1}


def test_counts_reach_the_lineage_record(tmp_path: Path) -> None:
    from kubeforge_runtime.train import output
    from kubeforge_runtime.train.config import parse_config

    cfg = parse_config({"model": {"uri": f"file://{tmp_path}"},
                        "dataset": {"uri": "file:///data/train.jsonl", "redact": ["email", "phone"]},
                        "output": {"uri": f"file://{tmp_path / 'out'}"}})
    record = output.lineage_record(cfg, tmp_path, {"redactions": {"email": 12, "phone": 3}})
    assert record["dataset"]["redact"] == ["email", "phone"]
    assert record["dataset"]["redactions"] == {"email": 12, "phone": 3}
    json.dumps(record)  # it is written as JSON


def test_preflight_logs_the_counts(base_config: dict[str, Any], tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    from kubeforge_runtime import launch

    src = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    cfg = merge(base_config, {"dataset": {"uri": f"file://{src}", "format": "prompt-completion",
                                          "redact": ["email", "creditCard", "idNumber"]},
                              "output": {"uri": f"file://{tmp_path / 'out'}"}})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with caplog.at_level(logging.INFO, logger="kubeforge_runtime.launch"):
        launch.preflight(str(path), [])
    assert f"dataset file://{src}: 17 records; dataset.redact replaces email=12 creditCard=4 idNumber=4" in caplog.text
    assert src.read_text() == "".join(json.dumps(r) + "\n" for r in RECORDS)
