"""The data red lines (kubeforge_runtime/datacheck.py) on real JSONL files.

Every line is tried on files whose measured value sits at its threshold (passes: a ``max*``
line is crossed only above it, ``minRecords`` only below it) and one record beyond it (fails,
with the measured value and the threshold in the message).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubeforge_runtime import data, datacheck


def write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def text(i: int) -> dict[str, str]:
    return {"text": f"record number {i} about topic {i * 7}"}


@pytest.mark.parametrize("bad, passed", [(1, True), (2, True), (3, False)])
def test_max_unparseable_share(tmp_path: Path, bad: int, passed: bool) -> None:
    # 20 non-blank lines, `bad` of them unusable (invalid JSON, or not a text record); blank lines do not count.
    lines: list[Any] = [text(i) for i in range(20 - bad)] + ["{not json", {"txt": "typo"}, "[1, 2]"][:bad] + [""]
    report = datacheck.check_file(write(tmp_path / "d.jsonl", lines), "text", {"maxUnparseableShare": 0.1})
    m = report.measurements
    assert (m.unparseableRecords, m.records) == (bad, 20 - bad)
    assert m.unparseableShare == pytest.approx(bad / 20)
    assert report.passed is passed
    if not passed:
        assert "maxUnparseableShare: unparseableShare 0.15 is above the threshold 0.1" in report.message()
        assert len(report.errors) == 3 and all(f"{tmp_path / 'd.jsonl'}:" in e for e in report.errors)


@pytest.mark.parametrize("dups, passed", [(1, True), (2, True), (3, False)])
def test_max_duplicate_share_counts_exact_and_near_duplicates(tmp_path: Path, dups: int, passed: bool) -> None:
    # Copies of record 0: one byte-for-byte, the others differ only in whitespace or in a key not trained on.
    copies = [text(0), {"text": "  record number 0\tabout topic 0 "}, {**text(0), "id": "x-17"}][:dups]
    lines = [text(i) for i in range(20 - dups)] + copies
    report = datacheck.check_file(write(tmp_path / "d.jsonl", lines), "text", {"maxDuplicateShare": 0.1})
    m = report.measurements
    assert (m.records, m.duplicateRecords, m.exactDuplicateRecords) == (20, dups, 1)
    assert report.passed is passed
    if not passed:
        assert "maxDuplicateShare: duplicateShare 0.15 is above the threshold 0.1" in report.message()


def test_records_differing_in_content_are_not_duplicates(tmp_path: Path) -> None:
    lines = [{"prompt": "2+2?", "completion": "4"}, {"prompt": "2+3?", "completion": "4"},
             {"prompt": "2+2?", "completion": "5"}]
    m = datacheck.check_file(write(tmp_path / "d.jsonl", lines), "prompt-completion", {}).measurements
    assert m.duplicateRecords == 0 and m.duplicateShare == 0


def chat(i: int, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"review {i}: positive?"},
                         {"role": "assistant", "content": "let me think"},
                         {"role": "user", "content": "answer in one word"},
                         {"role": "assistant", "content": answer}]}


@pytest.mark.parametrize("fmt", ["prompt-completion", "chat"])
@pytest.mark.parametrize("majority, passed", [(8, True), (9, True), (10, False)])
def test_max_label_imbalance(tmp_path: Path, fmt: str, majority: int, passed: bool) -> None:
    # 3 "no" against `majority` "yes" (whitespace variants are the same label); for chat the
    # label is the last assistant message, not the first.
    answers = ["yes" if i % 2 else " yes\n" for i in range(majority)] + ["no"] * 3
    if fmt == "chat":
        lines = [chat(i, a) for i, a in enumerate(answers)]
    else:
        lines = [{"prompt": f"review {i}: positive?", "completion": a} for i, a in enumerate(answers)]
    report = datacheck.check_file(write(tmp_path / "d.jsonl", lines), fmt, {"maxLabelImbalance": 3})
    m = report.measurements
    assert m.labelClasses == 2 and m.labelImbalance == pytest.approx(majority / 3, abs=1e-6)
    assert report.passed is passed
    if not passed:
        assert "maxLabelImbalance: labelImbalance 3.33333 is above the threshold 3" in report.message()


def test_label_imbalance_is_not_measured_for_text_and_a_set_line_then_fails(tmp_path: Path) -> None:
    report = datacheck.check_file(write(tmp_path / "d.jsonl", [text(i) for i in range(5)]), "text",
                                  {"maxLabelImbalance": 3})
    assert report.measurements.labelImbalance is None
    assert not report.passed and "labelImbalance could not be measured" in report.message()


@pytest.mark.parametrize("records, passed", [(11, True), (10, True), (9, False)])
def test_min_records(tmp_path: Path, records: int, passed: bool) -> None:
    report = datacheck.check_file(write(tmp_path / "d.jsonl", [text(i) for i in range(records)]), "text",
                                  {"minRecords": 10})
    assert report.measurements.records == records and report.passed is passed
    if not passed:
        assert "minRecords: records 9 is below the threshold 10" in report.message()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from kubeforge_runtime.tiny import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("overlong, passed", [(1, True), (2, True), (3, False)])
def test_max_overlong_share(tmp_path: Path, tokenizer: Any, overlong: int, passed: bool) -> None:
    # The sequence length is exactly the token length (EOS included, as the trainer counts) of
    # the "edge" record: it is not overlong, one token more is.
    edge = {"text": " ".join(["the model learns from the data"] * 3)}
    length = len(data.tokenize_record(tokenizer, edge, "text")[0])
    longer = {"text": edge["text"] + " again"}
    assert len(data.tokenize_record(tokenizer, longer, "text")[0]) > length
    lines = [edge] + [text(i) for i in range(19 - overlong)] + [{"text": longer["text"] + " x" * i}
                                                               for i in range(overlong)]
    report = datacheck.check_file(write(tmp_path / "d.jsonl", lines), "text", {"maxOverlongShare": 0.1},
                                  tokenizer=tokenizer, sequence_length=length)
    m = report.measurements
    assert (m.overlongRecords, m.sequenceLength) == (overlong, length)
    assert report.passed is passed
    if not passed:
        assert "maxOverlongShare: overlongShare 0.15 is above the threshold 0.1" in report.message()


def test_overlong_without_a_tokenizer_is_not_measured_and_a_set_line_fails(tmp_path: Path) -> None:
    report = datacheck.check_file(write(tmp_path / "d.jsonl", [text(1)]), "text", {"maxOverlongShare": 0.5})
    assert report.measurements.overlongShare is None and not report.passed


def test_unset_lines_are_not_checked_and_every_crossed_line_is_reported(tmp_path: Path) -> None:
    lines = [text(0)] * 5 + ["oops"] * 5
    path = write(tmp_path / "d.jsonl", lines)
    assert datacheck.check_file(path, "text", {}).passed
    assert datacheck.check_file(path, "text", {"maxLabelImbalance": None, "minRecords": None}).passed
    report = datacheck.check_file(path, "text", {"maxUnparseableShare": 0.2, "maxDuplicateShare": 0.5,
                                                 "minRecords": 6})
    assert [v.check for v in report.violations] == ["maxUnparseableShare", "maxDuplicateShare", "minRecords"]
    result = report.result()
    assert result["passed"] is False and result["thresholds"] == {"maxUnparseableShare": 0.2,
                                                                  "maxDuplicateShare": 0.5, "minRecords": 6}
    assert result["measurements"]["duplicateShare"] == 0.8 and len(result["violations"]) == 3
    with pytest.raises(ValueError, match="unknown data checks"):
        datacheck.judge(report.measurements, {"maxDupes": 1})


def test_the_termination_report_is_json_under_4_kib(tmp_path: Path) -> None:
    path = write(tmp_path / ("x" * 200 + ".jsonl"), ["bad"] * 50 + [text(0)])
    report = datacheck.check_file(path, "text", {"maxUnparseableShare": 0, "maxDuplicateShare": 0, "minRecords": 100})
    body = json.loads(report.termination_report())
    assert len(report.termination_report()) <= 4000
    assert body["kind"] == "DataQualityReport" and body["passed"] is False and len(body["violations"]) == 2
    assert "unparseableShare 0.980392 is above the threshold 0" in body["message"]


@pytest.mark.parametrize("fmt", ["text", "prompt-completion", "chat"])
@pytest.mark.parametrize("with_pii, passed", [(1, True), (2, True), (3, False)])
def test_max_pii_share_counts_records_with_personal_data(tmp_path: Path, fmt: str, with_pii: int, passed: bool) -> None:
    # 20 records; `with_pii` carry one kind of personal data each in a string trained on (a real
    # card number, a Chinese mobile number, an email). Hard negatives in the others: a card-like
    # number failing Luhn, a version number, an order id.
    found = ["card 4111 1111 1111 1111 on file", "call me at 13812345678", "mail ana@example.org"][:with_pii]
    clean = ["card 4111 1111 1111 1112 on file", "version 1.2.3.4 shipped", "order 2024-000123 sent"]
    texts = found + [f"{clean[i % 3]} ({i})" for i in range(20 - with_pii)]
    if fmt == "text":
        lines: list[Any] = [{"text": t} for t in texts]
    elif fmt == "prompt-completion":  # personal data in the completion counts too
        lines = [{"prompt": f"note {i}:", "completion": t} for i, t in enumerate(texts)]
    else:
        lines = [{"messages": [{"role": "user", "content": f"note {i}"}, {"role": "assistant", "content": t}]}
                 for i, t in enumerate(texts)]
    path = write(tmp_path / "d.jsonl", lines)
    before = path.read_bytes()
    report = datacheck.check_file(path, fmt, {"maxPiiShare": 0.1})
    m = report.measurements
    assert (m.piiRecords, m.records) == (with_pii, 20)
    assert m.piiShare == pytest.approx(with_pii / 20)
    assert report.passed is passed
    if not passed:
        assert "maxPiiShare: piiShare 0.15 is above the threshold 0.1" in report.message()
    assert path.read_bytes() == before  # measured, never rewritten


def test_pii_is_measured_only_when_its_line_is_set(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [{"text": "mail ana@example.org"}, text(1)])
    assert datacheck.check_file(path, "text", {"minRecords": 1}).measurements.piiShare is None
    assert "piiShare" not in datacheck.check_file(path, "text", {}).result()["measurements"]
