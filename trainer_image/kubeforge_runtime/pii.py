"""Personal data in training text: find it, replace it with typed placeholders.

Called by ``data.prepare`` (``dataset.redact`` of a FineTuneJob: what the trainer sees is
redacted before tokenising; the source file is never written), by the pod's preflight
(``launch.py``, which logs the counts) and, through :func:`contains_pii`, by dataset checks
that only need a yes/no. Pure functions, no I/O::

    find_pii(text, kinds)    -> [Span(kind, start, end), ...]   non-overlapping, in text order
    redact(text, kinds)      -> (text with placeholders, Counter(kind -> replaced spans))
    contains_pii(text, kinds=ALL_KINDS) -> bool

Kinds (the API's spelling) and their placeholders:

* ``email`` -> ``<EMAIL>``: ``local@domain.tld`` with an alphabetic TLD (so ``pkg@1.2.3`` is
  not an address).
* ``phone`` -> ``<PHONE>``: numbers written internationally (``+44 20 7946 0958``, any
  country: found and validated against the numbering plan by ``phonenumbers``, Google's
  libphonenumber); Chinese mainland mobile numbers (11 digits ``1[3-9]xxxxxxxxx``, optionally
  grouped 3-4-4); North American numbers written with separators (``(415) 555-2671``,
  ``415-555-2671``, validated by ``phonenumbers``). Other countries' *national* formats are not
  looked for: without a country they are indistinguishable from order ids and amounts.
* ``ipAddress`` -> ``<IP_ADDRESS>``: IPv4 and IPv6, every candidate validated by
  :mod:`ipaddress` (so ``999.1.1.1``, MAC addresses and ``12:30:45`` are not addresses). A
  dotted quad right after "version"/"v"/"build"/"release" is taken for a version number.
* ``creditCard`` -> ``<CREDIT_CARD>``: 13-19 digits, unbroken or grouped with spaces or dashes
  (4-4-4-4[-3], Amex 4-6-5, Diners 4-6-4), that pass the Luhn check and start with an issuer
  prefix of a card network (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro).
  Luhn alone lets one random number in ten through; the prefix cuts that further.
* ``idNumber`` -> ``<ID_NUMBER>``: Chinese resident identity numbers (18 characters: region
  code, a real birth date ``YYYYMMDD``, sequence, ISO 7064 MOD 11-2 check character ``0-9X``),
  US Social Security numbers written ``AAA-GG-SSSS`` (never-issued areas 000, 666, 9xx, group
  00 and serial 0000 excluded) and UK National Insurance numbers (``AB 12 34 56 C``, with the
  prefixes HMRC never issues excluded). 15-digit pre-1999 Chinese ids (no check character)
  and bare 9-digit SSNs are not looked for: nothing tells them from other numbers.

Why hand-written patterns: the one maintained library that would cover all of this,
Presidio, needs a spaCy language model at run time (not downloadable in a cluster without
egress, and a heavy image layer) and has no Chinese id or mobile recognisers; what these
kinds need is a shape plus a checksum or a range check (Luhn, MOD 11-2, a calendar date,
:mod:`ipaddress`), which is a few lines each and testable exactly. Phone numbers are the
exception: numbering plans differ per country and change, so those go to ``phonenumbers``.

Word boundaries are ASCII (``re.ASCII``): Chinese text glues numbers to characters
(``手机13812345678``), which a Unicode ``\\w`` would take for one word.

Overlaps are resolved longest-first (a card number is not also three phone numbers).
Precision and recall per kind are measured on ``tests/unit/runtime/data/pii_corpus.jsonl``.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from collections import Counter
from typing import Iterable, Literal, NamedTuple, get_args

PiiKind = Literal["email", "phone", "ipAddress", "creditCard", "idNumber"]
ALL_KINDS: tuple[PiiKind, ...] = get_args(PiiKind)
PLACEHOLDERS: dict[str, str] = {
    "email": "<EMAIL>", "phone": "<PHONE>", "ipAddress": "<IP_ADDRESS>", "creditCard": "<CREDIT_CARD>",
    "idNumber": "<ID_NUMBER>",
}


class Span(NamedTuple):
    """``text[start:end]`` is personal data of ``kind``."""

    kind: str
    start: int
    end: int


# --- checksums --------------------------------------------------------------------------------

def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of a digit string, as card numbers carry it."""
    if not digits.isdigit() or len(digits) < 2:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"  # ISO 7064 MOD 11-2: check character for (sum of weighted digits) mod 11


def cn_id_check_char(first17: str) -> str:
    """The check character of a Chinese resident id whose first 17 digits are ``first17``."""
    return _ID_CHECK[sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS)) % 11]


def cn_id_valid(value: str) -> bool:
    """18 characters, a plausible region, a real birth date (1900..today) and the right check character."""
    if len(value) != 18 or not value[:17].isdigit() or value[0] not in "123456789":
        return False
    try:
        born = _dt.date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    if not _dt.date(1900, 1, 1) <= born <= _dt.date.today():
        return False
    return cn_id_check_char(value[:17]) == value[17].upper()


# --- detectors: each yields (kind, start, end) candidates that passed their checks ----------------
# The patterns start with a character class and check the character before it with a
# lookbehind placed after it ("\d(?<![\w.]\d)"): the regex engine then skips quickly to
# candidate characters, about twice as fast on prose as a leading lookbehind.

_EMAIL = re.compile(
    r"(?<![\w.+%-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-]|\.[A-Za-z0-9])", re.ASCII
)


def _emails(text: str) -> Iterable[Span]:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        local = m.group().split("@", 1)[0]
        if ".." not in local:
            yield Span("email", m.start(), m.end())


_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?![\w]|\.\d)", re.ASCII)
_VERSION_BEFORE = re.compile(r"(?:\bversion|\bver\.?|\bv|\bbuild|\brelease)[:\s]*$", re.IGNORECASE | re.ASCII)
_IPV6_HINT = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f:]|::", re.ASCII)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}|:)?(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3}(?![\w:]|\.\d)", re.ASCII)


def _ips(text: str) -> Iterable[Span]:
    for m in _IPV4.finditer(text):
        if _VERSION_BEFORE.search(text[max(0, m.start() - 10):m.start()]):
            continue
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        yield Span("ipAddress", m.start(), m.end())
    if not _IPV6_HINT.search(text):
        return
    for m in _IPV6.finditer(text):
        s = m.group()
        if not any(c.isalnum() for c in s):
            continue  # "::" alone is prose punctuation more often than the unspecified address
        if _ipv6_valid(s):
            yield Span("ipAddress", m.start(), m.end())
        elif s.count(":") == 8 and _ipv6_valid(s.rsplit(":", 1)[0]):
            # A full address with a port glued on without brackets (addr:443): the address.
            yield Span("ipAddress", m.start(), m.start() + len(s.rsplit(":", 1)[0]))


def _ipv6_valid(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


_CARD = re.compile(
    r"\d(?<![\w.-]\d)(?:"
    r"\d{12,18}"
    r"|\d{3}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?"  # 4-4-4-4, 4-4-4-4-3
    r"|\d{3}([ -])\d{6}\2\d{4,5}"                  # Amex 4-6-5, Diners 4-6-4
    r")(?![\w]|[.-]\d)", re.ASCII
)
# Issuer identification number prefixes of the networks (ranges inclusive) and their lengths.
_IIN: tuple[tuple[int, int, int, tuple[int, ...]], ...] = (
    (4, 4, 1, (13, 16, 19)),                       # Visa
    (51, 55, 2, (16,)), (2221, 2720, 4, (16,)),    # Mastercard
    (34, 34, 2, (15,)), (37, 37, 2, (15,)),        # American Express
    (6011, 6011, 4, (16, 19)), (644, 649, 3, (16, 19)), (65, 65, 2, (16, 19)),  # Discover
    (3528, 3589, 4, (16, 17, 18, 19)),             # JCB
    (300, 305, 3, (14, 16, 19)), (36, 36, 2, (14, 16, 19)), (38, 39, 2, (16, 19)),  # Diners Club
    (62, 62, 2, (16, 17, 18, 19)),                 # UnionPay
    (50, 50, 2, tuple(range(12, 20))), (56, 58, 2, tuple(range(12, 20))),  # Maestro
    (67, 69, 2, tuple(range(12, 20))),
)


def card_issuer_known(digits: str) -> bool:
    """Whether a card network issues numbers with this prefix and length."""
    for lo, hi, width, lengths in _IIN:
        if len(digits) in lengths and lo <= int(digits[:width]) <= hi:
            return True
    return False


def _cards(text: str) -> Iterable[Span]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if luhn_valid(digits) and card_issuer_known(digits):
            yield Span("creditCard", m.start(), m.end())


_CN_ID = re.compile(r"[1-9](?<![\w-][1-9])\d{16}[\dXx](?![\w]|-\d)", re.ASCII)
_SSN = re.compile(r"\d(?<![\w-]\d)\d{2}([- ])\d{2}\1\d{4}(?![\w]|-\d)", re.ASCII)
_NINO = re.compile(r"[A-CEGHJ-PR-TW-Z](?<![\w-][A-Z])[A-CEGHJ-NPR-TW-Z]( ?)\d{2}\1\d{2}\1\d{2}\1[A-D](?!\w)", re.ASCII)
_NINO_NEVER = ("BG", "GB", "KN", "NK", "NT", "TN", "ZZ")


def _ids(text: str) -> Iterable[Span]:
    for m in _CN_ID.finditer(text):
        if cn_id_valid(m.group()):
            yield Span("idNumber", m.start(), m.end())
    for m in _SSN.finditer(text):
        area, group, serial = m.group()[:3], m.group()[4:6], m.group()[7:]
        if area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000":
            yield Span("idNumber", m.start(), m.end())
    for m in _NINO.finditer(text):
        if m.group()[:2] not in _NINO_NEVER:
            yield Span("idNumber", m.start(), m.end())


_CN_MOBILE = re.compile(r"1(?<![\w.+/-]1)[3-9]\d([ -]?)\d{4}\1\d{4}(?![\w]|[.-]\d)", re.ASCII)
_NANP = re.compile(r"(?:\((?<![\w.+/-]\()\d{3}\) ?|\d(?<![\w.+/-]\d)\d{2}([-. ]))\d{3}(?(1)\1|[-. ])\d{4}"
                   r"(?![\w]|[.-]\d)", re.ASCII)


def _phones(text: str) -> Iterable[Span]:
    import phonenumbers

    for m in _CN_MOBILE.finditer(text):
        yield Span("phone", m.start(), m.end())
    for m in _NANP.finditer(text):
        try:
            number = phonenumbers.parse(m.group(), "US")
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            yield Span("phone", m.start(), m.end())
    if "+" in text:
        # Region "ZZ": only numbers written with their country code; the matcher already
        # declines dates, times and numbers glued to other digits.
        for pm in phonenumbers.PhoneNumberMatcher(text, "ZZ", leniency=phonenumbers.Leniency.VALID):
            yield Span("phone", pm.start, pm.end)


_DETECTORS = {"email": _emails, "phone": _phones, "ipAddress": _ips, "creditCard": _cards, "idNumber": _ids}


def _check_kinds(kinds: Iterable[str]) -> list[str]:
    kinds = list(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in _DETECTORS]
    if unknown:
        raise ValueError(f"unknown PII kind(s) {unknown}; choose from {list(ALL_KINDS)}")
    return kinds


# --- the API ------------------------------------------------------------------------------------

def find_pii(text: str, kinds: Iterable[str] = ALL_KINDS) -> list[Span]:
    """Non-overlapping spans of personal data of ``kinds`` in ``text``, in order.

    Where detectors disagree (a grouped card number also looks like phone numbers), the
    longest span wins; equal lengths go to the kind listed first in :data:`ALL_KINDS`."""
    wanted = _check_kinds(kinds)
    order = {k: i for i, k in enumerate(ALL_KINDS)}
    found = {s for k in wanted for s in _DETECTORS[k](text)}
    chosen: list[Span] = []
    for s in sorted(found, key=lambda s: (-(s.end - s.start), order[s.kind], s.start)):
        if all(s.end <= c.start or s.start >= c.end for c in chosen):
            chosen.append(s)
    return sorted(chosen, key=lambda s: s.start)


def redact(text: str, kinds: Iterable[str] = ALL_KINDS) -> tuple[str, Counter[str]]:
    """``text`` with every span of :func:`find_pii` replaced by its kind's placeholder, and the
    number of replacements per kind."""
    spans = find_pii(text, kinds)
    if not spans:
        return text, Counter()
    out, pos = [], 0
    for s in spans:
        out += [text[pos:s.start], PLACEHOLDERS[s.kind]]
        pos = s.end
    out.append(text[pos:])
    return "".join(out), Counter(s.kind for s in spans)


def contains_pii(text: str, kinds: Iterable[str] = ALL_KINDS) -> bool:
    """Whether ``text`` holds personal data of any of ``kinds`` (for checks that only need yes/no)."""
    wanted = _check_kinds(kinds)
    return any(next(iter(_DETECTORS[k](text)), None) is not None for k in wanted)
