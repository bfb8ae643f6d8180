"""Writes pii_corpus.jsonl: the labelled corpus test_pii.py measures precision and recall on.

Run from the repository root (deterministic; the output is committed, so review its diff)::

    python tests/unit/runtime/data/make_pii_corpus.py

Each line is ``{"text": ..., "pii": [[kind, exact substring], ...]}``. Positives are real-shaped
values (valid check digits, real numbering plans, issuer prefixes) in English and Chinese
sentences; hard negatives are the numbers that look like them and are not: version numbers,
dates, timestamps, order and tracking ids, decimals, 16-digit numbers failing Luhn, 18-char
ids with a wrong check character or an impossible birth date, MAC addresses, npm specs.
This file builds values with its own code (it does not import the detector).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261201
R = random.Random(SEED)
OUT = Path(__file__).with_name("pii_corpus.jsonl")


def luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def digits(n: int) -> str:
    return "".join(R.choice("0123456789") for _ in range(n))


def card(prefix: str, length: int) -> str:
    body = prefix + digits(length - len(prefix) - 1)
    return body + luhn_digit(body)


def group(number: str, sizes: tuple[int, ...], sep: str) -> str:
    out, i = [], 0
    for s in sizes:
        out.append(number[i:i + s])
        i += s
    return sep.join(out)


def formatted_card() -> str:
    kind = R.choice(["visa", "mc", "mc2", "amex", "disc", "unionpay", "jcb"])
    if kind == "amex":
        n = card(R.choice(["34", "37"]), 15)
        return R.choice([n, group(n, (4, 6, 5), " "), group(n, (4, 6, 5), "-")])
    prefix = {"visa": "4", "mc": str(R.randint(51, 55)), "mc2": str(R.randint(2221, 2720)), "disc": "6011",
              "unionpay": "62", "jcb": str(R.randint(3528, 3589))}[kind]
    n = card(prefix, 16)
    return R.choice([n, group(n, (4, 4, 4, 4), " "), group(n, (4, 4, 4, 4), "-")])


def bad_luhn_16() -> str:
    n = card(R.choice(["4", "51", "62", "6011"]), 16)
    return n[:-1] + str((int(n[-1]) + R.randint(1, 9)) % 10)


W = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
REGIONS = ["110105", "310101", "440305", "510107", "330106", "420102", "610113", "120101"]


def cn_id(check_ok: bool = True, want_x: bool = False) -> str:
    while True:
        y, m, d = R.randint(1950, 2008), R.randint(1, 12), R.randint(1, 28)
        body = f"{R.choice(REGIONS)}{y:04d}{m:02d}{d:02d}{digits(3)}"
        check = "10X98765432"[sum(int(c) * w for c, w in zip(body, W)) % 11]
        if want_x and check != "X":
            continue
        if not check_ok:
            check = R.choice([c for c in "0123456789X" if c != check])
        return body + check


def cn_id_bad_date() -> str:
    body = f"{R.choice(REGIONS)}{R.choice(['19990230', '20011345', '19870631', '21200101'])}{digits(3)}"
    return body + "10X98765432"[sum(int(c) * w for c, w in zip(body, W)) % 11]  # right check, impossible date


def ssn() -> str:
    area = R.choice([n for n in range(1, 900) if n != 666])
    return f"{area:03d}-{R.randint(1, 99):02d}-{R.randint(1, 9999):04d}"


def nino() -> str:
    first = R.choice("ABCEGHJKLMNPRSTWXYZ")
    second = R.choice("ABCEGHJKLMNPRSTWXYZ")
    while first + second in ("BG", "GB", "KN", "NK", "NT", "TN", "ZZ"):
        second = R.choice("ABCEGHJKLMNPRSTWXYZ")
    d = digits(6)
    return R.choice([f"{first}{second}{d}{R.choice('ABCD')}", f"{first}{second} {d[:2]} {d[2:4]} {d[4:]} {R.choice('ABCD')}"])


def cn_mobile() -> str:
    n = "1" + R.choice("3456789") + digits(9)
    return R.choice([n, n, f"{n[:3]}-{n[3:7]}-{n[7:]}", f"{n[:3]} {n[3:7]} {n[7:]}"])


INTERNATIONAL = [
    "+44 20 7946 0958", "+1 415-555-2671", "+49 30 901820", "+33 1 42 68 53 00", "+81 3-3224-9999",
    "+86 138 1234 5678", "+61 2 9374 4000", "+91 98765 43210", "+34 912 34 56 78", "+39 06 6982",
    "+55 11 91234-5678", "+7 495 123-45-67", "+27 21 460 9111", "+65 6123 4567", "+852 2123 4567",
    "+86 10 6552 9988", "+1 (212) 736-5000", "+44 7911 123456", "+353 1 234 5678", "+46 8 123 456 78",
]
NANP_AREAS = ["212", "415", "646", "312", "617", "206", "303", "512", "702", "919"]


def nanp() -> str:
    a, ex, line = R.choice(NANP_AREAS), f"{R.randint(2, 9)}{digits(2)}", digits(4)
    return R.choice([f"({a}) {ex}-{line}", f"{a}-{ex}-{line}", f"{a}.{ex}.{line}"])


def phone() -> str:
    return R.choice([R.choice(INTERNATIONAL), cn_mobile(), cn_mobile(), nanp()])


FIRST = ["john", "mary", "li.wei", "zhang_san", "a.kumar", "o'neil", "sofia", "wang-fang", "dev+ml", "jp2024"]
DOMAINS = ["example.com", "mail.example.org", "corp.example.co.uk", "163.com", "qq.com", "uni.example.edu",
           "example.cn", "gmail.com", "sub.dept.example.io"]


def email() -> str:
    local = R.choice(FIRST).replace("'", "")
    if R.random() < 0.3:
        local += str(R.randint(1, 99))
    e = f"{local}@{R.choice(DOMAINS)}"
    return e.upper() if R.random() < 0.1 else e


def ipv4() -> str:
    return R.choice([f"192.168.{R.randint(0, 255)}.{R.randint(1, 254)}", f"10.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(1, 254)}",
                     f"{R.randint(11, 223)}.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(1, 254)}", "127.0.0.1", "8.8.8.8"])


def ipv6() -> str:
    h = lambda: f"{R.randint(0, 0xffff):x}"  # noqa: E731
    return R.choice([f"2001:db8::{h()}", f"fe80::{h()}:{h()}:{h()}:{h()}", "::1",
                     ":".join(h() for _ in range(8)), f"2001:0db8:85a3:0000:0000:8a2e:0370:{R.randint(0, 0xffff):04x}",
                     f"::ffff:192.0.2.{R.randint(1, 254)}", f"2400:cb00:{h()}::{h()}"])


def ip() -> str:
    return ipv4() if R.random() < 0.55 else ipv6()


def id_number() -> str:
    return R.choice([cn_id(), cn_id(), cn_id(want_x=True), ssn(), nino()])


GEN = {"email": email, "phone": phone, "ipAddress": ip, "creditCard": formatted_card, "idNumber": id_number}

TEMPLATES = {
    "email": ["Please reply to {} before Friday.", "联系邮箱：{}，工作日回复。", "From: Support <{}>", "cc {}; thanks!",
              "My address is {} if you need the invoice.", "用户 {} 反馈登录失败。"],
    "phone": ["Call me on {} after 6pm.", "客户电话：{}，请回访。", "Phone: {}", "You can reach the front desk at {}.",
              "紧急联系人手机 {}", "tel. {} (office)"],
    "ipAddress": ["Login from {} was blocked.", "服务器地址 {}，端口 22。", "GET /index.html from {}:443", "whitelist: {}",
                  "The client IP was {}.", "连接 {} 超时"],
    "creditCard": ["Card number {} expires 09/27.", "付款卡号：{}", "charged to {} yesterday", "Visa/MC {} (CVV withheld)",
                   "银行卡 {} 已绑定", "Refund to card {}."],
    "idNumber": ["身份证号：{}", "ID: {}", "SSN {} on file", "her national insurance number is {}",
                 "Applicant identity number {}, verified.", "证件号码 {} 已实名"],
}

NEGATIVES = [
    lambda: f"Upgraded to version {R.randint(1, 9)}.{R.randint(0, 20)}.{R.randint(0, 9)}.{R.randint(0, 9)} last week.",
    lambda: f"Requires Python 3.{R.randint(8, 13)}.{R.randint(0, 9)} and torch 2.{R.randint(0, 9)}.{R.randint(0, 3)}.",
    lambda: f"Windows build 10.0.{R.randint(19041, 22631)}.{R.randint(100, 4000)} installed.",
    lambda: f"Released v{R.randint(1, 4)}.{R.randint(0, 9)}.{R.randint(0, 9)}.{R.randint(0, 9)} on 2023-{R.randint(1, 12):02d}-{R.randint(1, 28):02d}.",
    lambda: f"Meeting on 2024-{R.randint(1, 12):02d}-{R.randint(1, 28):02d} at {R.randint(0, 23):02d}:{R.randint(0, 59):02d}:{R.randint(0, 59):02d}.",
    lambda: f"Logged at 2023-11-{R.randint(10, 28)}T{R.randint(0, 23):02d}:{R.randint(0, 59):02d}:{R.randint(0, 59):02d}.{digits(3)}Z",
    lambda: f"时间戳 {R.randint(1600000000, 1799999999)}，毫秒 {R.randint(1600000000000, 1799999999999)}",
    lambda: f"Order ORD-{R.randint(2020, 2025)}{R.randint(1, 12):02d}{R.randint(1, 28):02d}-{digits(6)} shipped.",
    lambda: f"订单号 {digits(19)} 已发货",
    lambda: f"order #{R.randint(1000000000, 9999999999)} is delayed",
    lambda: f"Tracking number 1Z{digits(3)}AA{digits(10)}.",
    lambda: f"Reference {bad_luhn_16()} could not be matched.",
    lambda: f"transaction id {bad_luhn_16()}",
    lambda: f"随机编号 {bad_luhn_16()}",
    lambda: f"身份证号 {cn_id(check_ok=False)} 校验失败",
    lambda: f"ID {cn_id(check_ok=False)} rejected (bad check digit)",
    lambda: f"证件 {cn_id_bad_date()} 日期无效",
    lambda: f"pi is about 3.{digits(14)}, e about 2.{digits(10)}",
    lambda: f"Total: {R.randint(1000, 99999)}.{digits(4)} USD, ratio 0.{digits(11)}",
    lambda: f"余额 {R.randint(100, 99999)}.{digits(2)} 元，利率 0.{digits(10)}",
    lambda: f"Invalid address {R.randint(256, 999)}.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(0, 255)} in config.",
    lambda: f"MAC {':'.join(f'{R.randint(0, 255):02X}' for _ in range(6))} on eth0",
    lambda: f"Run at {R.randint(0, 23):02d}:{R.randint(0, 59):02d}:{R.randint(0, 59):02d}; std::vector<int> v;",
    lambda: f"npm install lodash@4.17.{R.randint(0, 21)} react@18.{R.randint(0, 3)}.0",
    lambda: f"Follow @kubeforge_{R.randint(1, 99)} for updates.",
    lambda: f"ISBN 978-{R.randint(0, 9)}-{digits(2)}-{digits(6)}-{R.randint(0, 9)}",
    lambda: f"Gain was +{R.randint(1, 9)}.{R.randint(0, 9)} dB, +{R.randint(1, 40)}% over baseline.",
    lambda: f"Batch {digits(12)} contains {R.randint(10, 99)} items.",
    lambda: f"Coordinates 39.{digits(6)}, 116.{digits(6)}",
    lambda: f"Serial SN{digits(8)}-{digits(4)}, part 12-{digits(4)}-{digits(3)}",
    lambda: f"Score 3:{R.randint(0, 5)}; ratio 16:9; page 12 of 300.",
    lambda: f"Firmware {R.randint(1, 9)}.{R.randint(0, 9)}.{R.randint(0, 9)} (build {R.randint(2020, 2025)}.{R.randint(1, 12)}.{R.randint(1, 28)}), checksum {digits(8)}",
    lambda: f"设备号 {R.choice('23456789')}{digits(10)} 在线",
]

# Written by hand: text as people write it, including what the detector is known to miss
# (other countries' national phone formats, zero-padded IPv4), so the figures are not flattered.
HANDWRITTEN: list[tuple[str, list[tuple[str, str]]]] = [
    ("手机13812345678，邮箱zhangsan@163.com", [("phone", "13812345678"), ("email", "zhangsan@163.com")]),
    ("身份证号11010519491231002X，请核对", [("idNumber", "11010519491231002X")]),
    ("联系电话+86-139-1234-5678（微信同号）", [("phone", "+86-139-1234-5678")]),
    ("mailto:ops-team@example.com?subject=outage", [("email", "ops-team@example.com")]),
    ("<a href=\"mailto:Jane.Doe@Example.ORG\">Jane</a>", [("email", "Jane.Doe@Example.ORG")]),
    ("Version: 1.2.3.4 was deployed to server 10.0.0.12 at 09:15.", [("ipAddress", "10.0.0.12")]),
    ("curl http://[2001:db8:1::ab9:c0a8:102]:8080/health", [("ipAddress", "2001:db8:1::ab9:c0a8:102")]),
    ("ssh root@203.0.113.7 -p 2222", [("ipAddress", "203.0.113.7")]),
    ("Pay to 4000 0566 5566 5556 by 2025-01-31; invoice INV-2025-000123.", [("creditCard", "4000 0566 5566 5556")]),
    ("SSN: 078-05-1120 (the Woolworth wallet number), DOB 1938-04-01", [("idNumber", "078-05-1120")]),
    ("NI number QQ 12 34 56 C is the HMRC example and is never issued.", []),
    ("Her NINO is AB123456C and her phone +44 7911 123456.", [("idNumber", "AB123456C"), ("phone", "+44 7911 123456")]),
    ("Release 2.4.1.0 (build 2024.11.15) fixes CVE-2024-12345.", []),
    ("The 16-digit voucher 1234 5678 9012 3456 is not a card.", []),
    ("Call 020 7946 0958 for the London office.", [("phone", "020 7946 0958")]),
    ("座机 010-6552-9988 转 8001", [("phone", "010-6552-9988")]),
    ("legacy host 192.168.001.010 in the old inventory", [("ipAddress", "192.168.001.010")]),
    ("Loss 0.13812345678 at step 13812345678?", [("phone", "13812345678")]),
    ("From 2001:db8::1 to 198.51.100.23 via fe80::1ff:fe23:4567:890a.",
     [("ipAddress", "2001:db8::1"), ("ipAddress", "198.51.100.23"), ("ipAddress", "fe80::1ff:fe23:4567:890a")]),
    ("Order 6222021234567890 was refunded.", []),
    ("UnionPay 6222 0212 3456 7894 bound to the account", [("creditCard", "6222 0212 3456 7894")]),
    ("Timestamps: 1700000000, 1700000000123, 20231115093012", []),
    ("Time 12:30:45, ratio 16:9, C++ std::map, MAC 3c:22:fb:01:ab:cd", []),
    ("See docs at https://example.com/v1.2.3.4/ and email support@example.com.", [("email", "support@example.com")]),
    ("Cell (646) 555-0143 / office 212.736.5000", [("phone", "(646) 555-0143"), ("phone", "212.736.5000")]),
    ("Amex 3714 496353 98431 declined; Diners 3056 930902 5904 ok.",
     [("creditCard", "3714 496353 98431"), ("creditCard", "3056 930902 5904")]),
    ("IDs in the batch: 440305199001011234 (bad check), 44030519900101123X",
     [("idNumber", "44030519900101123X")]),
]


def line(text: str, pii: list[tuple[str, str]]) -> dict:
    for kind, value in pii:
        assert value in text, (kind, value, text)
    return {"text": text, "pii": [list(p) for p in pii]}


def render() -> str:
    """The corpus as JSONL text (the same every call)."""
    global R
    R = random.Random(SEED)
    rows = []
    for kind, gen in GEN.items():
        for i in range(40):
            value = gen()
            template = TEMPLATES[kind][i % len(TEMPLATES[kind])]
            if ":" in value and "{}:" in template:
                template = template.replace("{}:", "[{}]:")  # an IPv6 address with a port is written [addr]:port
            rows.append(line(template.format(value), [(kind, value)]))
    for i in range(130):
        rows.append(line(NEGATIVES[i % len(NEGATIVES)](), []))
    for _ in range(40):  # mixed: several kinds and a distractor in one record
        kinds = R.sample(list(GEN), 3)
        values = [(k, GEN[k]()) for k in kinds]
        distractor = R.choice(NEGATIVES)()
        text = (f"Ticket: user {values[0][1]} reported that {values[1][1]} was used; "
                f"also {values[2][1]}. Note: {distractor}")
        rows.append(line(text, values))
    rows += [line(text, pii) for text, pii in HANDWRITTEN]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> None:
    text = render()
    OUT.write_text(text, encoding="utf-8")
    print(f"{text.count(chr(10))} lines -> {OUT}")


if __name__ == "__main__":
    main()
