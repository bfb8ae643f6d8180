"""The PII detector (kubeforge_runtime.pii): measured precision and recall, and its checksums.

The corpus (data/pii_corpus.jsonl, written by data/make_pii_corpus.py) labels every span of
personal data by kind and exact text, and mixes in hard negatives (versions, dates,
timestamps, order ids, decimals, numbers failing Luhn, ids with a wrong check character).
A predicted span counts only when its kind and its exact text match a label.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kubeforge_runtime import pii

CORPUS = Path(__file__).with_name("data") / "pii_corpus.jsonl"
THRESHOLD = 0.95


def _score() -> dict[str, dict[str, float]]:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for raw in CORPUS.read_text(encoding="utf-8").splitlines():
        row = json.loads(raw)
        text = row["text"]
        gold = Counter((k, v) for k, v in row["pii"])
        pred = Counter((s.kind, text[s.start:s.end]) for s in pii.find_pii(text, pii.ALL_KINDS))
        for (kind, _), n in (gold & pred).items():
            tp[kind] += n
        for (kind, _), n in (pred - gold).items():
            fp[kind] += n
        for (kind, _), n in (gold - pred).items():
            fn[kind] += n
    out = {}
    for kind in [*pii.ALL_KINDS, "overall"]:
        t, f_p, f_n = ((sum(c.values()) for c in (tp, fp, fn)) if kind == "overall" else (tp[kind], fp[kind], fn[kind]))
        out[kind] = {"precision": t / (t + f_p) if t + f_p else 1.0, "recall": t / (t + f_n) if t + f_n else 1.0,
                     "tp": t, "fp": f_p, "fn": f_n}
    return out


def test_precision_and_recall_per_kind_and_overall_on_the_labelled_corpus() -> None:
    scores = _score()
    lines = [f"{k:11s} precision {v['precision']:.3f} recall {v['recall']:.3f} (tp {v['tp']}, fp {v['fp']}, fn {v['fn']})"
             for k, v in scores.items()]
    print("\n" + "\n".join(lines))
    assert scores["overall"]["tp"] >= 200, "the corpus must hold enough positives to measure anything"
    for kind, v in scores.items():
        assert v["tp"] > 0, kind
        assert v["precision"] >= THRESHOLD and v["recall"] >= THRESHOLD, "\n".join(lines)


def test_corpus_is_big_enough_has_hard_negatives_and_is_what_its_generator_writes() -> None:
    import runpy

    rows = [json.loads(x) for x in CORPUS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 300
    assert sum(1 for r in rows if not r["pii"]) >= 100
    generator = runpy.run_path(str(CORPUS.with_name("make_pii_corpus.py")))
    assert generator["render"]() == CORPUS.read_text(encoding="utf-8"), (
        "pii_corpus.jsonl differs from make_pii_corpus.py: run it and review the diff")


# --- checksums ----------------------------------------------------------------------------------

def _luhn_complete(body: str) -> str:
    return next(body + d for d in "0123456789" if pii.luhn_valid(body + d))


@pytest.mark.parametrize("number", ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117",
                                    "3530111333300000", "6212345678901232"])
def test_real_card_numbers_are_redacted_in_any_grouping(number: str) -> None:
    assert pii.luhn_valid(number)
    groups = (4, 6, 5) if len(number) == 15 else (4, 4, 4, 4)
    parts, i = [], 0
    for g in groups:
        parts.append(number[i:i + g])
        i += g
    for written in (number, " ".join(parts), "-".join(parts)):
        out, counts = pii.redact(f"pay with {written} today", ["creditCard"])
        assert out == "pay with <CREDIT_CARD> today" and counts == Counter(creditCard=1), written


def test_a_number_failing_luhn_is_not_a_card() -> None:
    good = _luhn_complete("411111111111111")
    for last in "0123456789":
        candidate = good[:-1] + last
        found = pii.find_pii(f"ref {candidate}", ["creditCard"])
        assert bool(found) == (candidate == good), candidate
    # Random 16-digit numbers: only the Luhn-valid ones with an issuer prefix are taken.
    import random

    r = random.Random(0)
    for _ in range(500):
        n = "".join(r.choice("0123456789") for _ in range(16))
        expected = pii.luhn_valid(n) and pii.card_issuer_known(n)
        assert bool(pii.find_pii(n, ["creditCard"])) == expected, n


def test_cn_resident_id_needs_its_mod_11_2_check_character_and_a_real_birth_date() -> None:
    assert pii.cn_id_check_char("11010519491231002") == "X"  # the GB 11643-1999 worked example
    assert pii.cn_id_valid("11010519491231002X") and pii.cn_id_valid("11010519491231002x")
    for wrong in "0123456789":
        assert not pii.cn_id_valid("11010519491231002" + wrong)
        assert pii.find_pii(f"身份证 11010519491231002{wrong}", ["idNumber"]) == []
    assert pii.redact("身份证 11010519491231002X 已登记", ["idNumber"])[0] == "身份证 <ID_NUMBER> 已登记"
    body = "44030520230230123"  # 30 February
    assert not pii.cn_id_valid(body + pii.cn_id_check_char(body))
    body = "44030521990101123"  # born in the future
    assert not pii.cn_id_valid(body + pii.cn_id_check_char(body))


def test_phone_formats() -> None:
    found = lambda t: [t[s.start:s.end] for s in pii.find_pii(t, ["phone"])]  # noqa: E731
    assert found("手机 13812345678，备用 139-1234-5678") == ["13812345678", "139-1234-5678"]
    assert found("call +44 20 7946 0958 or +86 138 1234 5678") == ["+44 20 7946 0958", "+86 138 1234 5678"]
    assert found("office (415) 555-2671") == ["(415) 555-2671"]
    # 12 digits, a leading 12, a decimal, a timestamp and a date are not phone numbers.
    assert found("batch 138123456789, code 12812345678, x 0.13812345678, ts 1700000000123, 2023-11-15") == []


def test_ip_addresses_are_validated() -> None:
    found = lambda t: [t[s.start:s.end] for s in pii.find_pii(t, ["ipAddress"])]  # noqa: E731
    assert found("from 192.168.1.20:8080 and 2001:db8::1, not 256.1.1.1 nor 00:1A:2B:3C:4D:5E nor 12:30:45") == [
        "192.168.1.20", "2001:db8::1"]
    assert found("upgrade to version 1.2.3.4 (v2.0.0.1)") == []


def test_emails_and_contains_pii() -> None:
    assert pii.redact("mail Li.Wei+ml@mail.example.cn, not lodash@4.17.21", ["email"]) == (
        "mail <EMAIL>, not lodash@4.17.21", Counter(email=1))
    assert pii.contains_pii("write to a.b@example.org")
    assert not pii.contains_pii("write to a.b@example.org", ["phone"])
    assert not pii.contains_pii("released 2.3.1 on 2023-11-15 at 12:30:45, order 20231115123456")
    with pytest.raises(ValueError, match="unknown PII kind"):
        pii.find_pii("x", ["passport"])


def test_only_the_asked_kinds_are_redacted_and_overlaps_resolve_to_the_longest() -> None:
    text = "card 4111-1111-1111-1111, mail x@example.com"
    assert pii.redact(text, ["email"])[0] == "card 4111-1111-1111-1111, mail <EMAIL>"
    out, counts = pii.redact(text, pii.ALL_KINDS)
    assert out == "card <CREDIT_CARD>, mail <EMAIL>" and counts == Counter(creditCard=1, email=1)
