"""Write trainer_image/kubeforge_runtime/assets/reference-text.jsonl: real English prose for perplexity.

A QuantizeJob without an evaluation URI compares a model with its quantized self on this
text (kubeforge_runtime/quantize/data.py). It must be prose this project did not write and
that no starter trains on. It is taken, paragraph by paragraph, from two sources that every
runtime environment already has, both under permissive licences:

* CPython's documentation: ``pydoc_data.topics`` (the Python Language Reference as plain
  text, shipped with the interpreter for ``help()``), PSF-2.0;
* the long descriptions (``METADATA``) of installed packages whose licence is MIT, BSD,
  Apache-2.0 or PSF.

A paragraph qualifies when it is plain prose: 200-800 characters, starts with a capital and
ends with a full stop, no indented (code) lines, list or table markers, and none of the
characters and patterns that mark code or markup (backticks, ``*``, ``_``, ``=``, brackets,
``()``, ``::``, URLs, dotted names). Of the qualifying paragraphs (at most two per reference
topic, topics in name order; at most two per package, packages in name order), 24 of the
reference and 16 of the package descriptions are kept, evenly spaced through each list.

This was run once, with the kubeforge runtime environment (Python 3.11.7, the package
versions recorded per record); another environment gives other text, and that is fine: the
committed file is the reference, and this script documents how it was made::

    python hack/make-reference-text.py
"""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "trainer_image" / "kubeforge_runtime" / "assets" / "reference-text.jsonl"
MARKUP = re.compile(r"[`*_=<>{}\[\]|#@\\$~^]|\(\)|::|\.\.\.|https?:|www\.|\d\.\d|[a-z]\.[a-z]|“\"")
PERMISSIVE = re.compile(r"\b(MIT|BSD|Apache|PSF|Python Software Foundation)\b", re.I)
NOT_PERMISSIVE = re.compile(r"GPL|MPL|Mozilla|Proprietary|NVIDIA|CNRI|style", re.I)
N_DOCS, N_PACKAGES = 24, 16


def prose(paragraph: str) -> str | None:
    lines = paragraph.split("\n")
    if any(line.startswith(("   ", "\t", ">", "-", "*", "|", "+", "..")) for line in lines):
        return None
    text = " ".join(paragraph.split())
    if not 200 <= len(text) <= 800 or MARKUP.search(text):
        return None
    if not text[0].isupper() or not text.endswith("."):
        return None
    return text


def licence_of(meta) -> str | None:
    expr = meta.get("License-Expression") or ""
    field = (meta.get("License") or "").splitlines()[0] if meta.get("License") else ""
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    for candidate in (expr, field, *classifiers):
        if candidate and len(candidate) < 60 and PERMISSIVE.search(candidate) and not NOT_PERMISSIVE.search(candidate):
            return candidate
    return None


def from_docs() -> list[dict]:
    import pydoc_data.topics as topics

    source = f"cpython {platform.python_version()} (pydoc_data.topics: the Python Language Reference)"
    out = []
    for topic in sorted(topics.topics):
        kept = [p for p in map(prose, re.split(r"\n\s*\n", topics.topics[topic])) if p][:2]
        out += [{"text": t, "source": source, "license": "PSF-2.0"} for t in kept]
    step = max(1, len(out) // N_DOCS)  # spread over the topics
    return out[::step][:N_DOCS]


def from_packages() -> list[dict]:
    seen, texts, out = set(), set(), []
    for dist in sorted(md.distributions(), key=lambda d: d.metadata["Name"].lower()):
        meta = dist.metadata
        name = meta["Name"]
        licence = licence_of(meta)
        if name.lower() in seen or name.lower() == "kubeforge" or licence is None:
            continue
        seen.add(name.lower())
        body = meta.get_payload() or meta.get("Description") or ""
        kept = [p for p in map(prose, re.split(r"\n\s*\n", body)) if p and p not in texts][:2]
        texts.update(kept)  # forks (httpcore, httpcore2) share paragraphs
        out += [{"text": t, "source": f"{name} {meta['Version']} (package description)", "license": licence}
                for t in kept]
    # Spread over the alphabet rather than the first few packages.
    step = max(1, len(out) // N_PACKAGES)
    return out[::step][:N_PACKAGES]


def main() -> None:
    records = from_docs() + from_packages()
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts) and all(len(t) >= 200 for t in texts)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"{OUT}: {len(records)} paragraphs, {sum(map(len, texts))} characters")


if __name__ == "__main__":
    main()
