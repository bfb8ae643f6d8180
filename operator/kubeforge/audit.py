"""``kubeforge audit``: the lineage chain FineTuneJob -> QuantizeJob -> InferenceService.

Three sources, one tree:

* the cluster (``kubeforge audit finetunejob/NAME``): the resources and their status; the
  trainer and the quantizer report their output's lineage digest in ``status.result.lineageDigest``
  (through the termination log), so no output volume needs to be mounted to audit;
* a local run (``kubeforge audit KIND/NAME -f FILE --workdir DIR``, as ``kubeforge run`` left
  it): the resources of FILE and the ``kubeforge.json`` of each output under DIR;
* an output directory (``kubeforge audit --dir DIR``): its ``kubeforge.json``, whose ``input``
  nests the records it was made from.

From the named resource the chain is followed up its ``spec.model.*Ref`` to the first job,
then down to every resource that names one in the chain. Where a lineage record is at hand,
its digests are recomputed (``kubeforge_runtime.lineage.verify``, pure JSON and hashlib; no
torch) and, for an output directory, its model files are hashed again and compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .api import KINDS

REFS = {"fineTuneJobRef": "FineTuneJob", "quantizeJobRef": "QuantizeJob"}
"""spec.model keys that name an earlier resource, and the kind they name."""


class AuditError(RuntimeError):
    """The resource or output to audit cannot be found; the message says what is missing."""


def parse_ref(text: str) -> tuple[str, str]:
    """``finetunejob/NAME`` (any plural, short name or case) -> (``FineTuneJob``, NAME)."""
    kind_text, sep, name = text.partition("/")
    if not sep or not name:
        raise AuditError(f"{text!r}: give KIND/NAME, e.g. finetunejob/my-job")
    wanted = kind_text.lower()
    for k in KINDS:
        if wanted in {k.kind.lower(), k.plural, *k.short_names}:
            return k.kind, name
    raise AuditError(f"{kind_text!r} is not a KubeForge kind (finetunejob, quantizejob, inferenceservice)")


def _input_ref(obj: dict[str, Any]) -> tuple[str, str] | None:
    model = (obj.get("spec") or {}).get("model") or {}
    for key, kind in REFS.items():
        ref = model.get(key)
        if isinstance(ref, dict) and ref.get("name"):
            return kind, str(ref["name"])
    return None


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _node(obj: dict[str, Any], record: dict[str, Any] | None, problems: list[str]) -> dict[str, Any]:
    """One resource of the chain as printed (and as ``--json`` gives it)."""
    status = obj.get("status") or {}
    result = status.get("result") or {}
    spec = obj.get("spec") or {}
    node: dict[str, Any] = {
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "namespace": obj["metadata"].get("namespace", "default"),
        "phase": status.get("phase"),
    }
    if obj["kind"] == "InferenceService":
        node["modelUri"] = status.get("modelUri") or (spec.get("model") or {}).get("uri")
    else:
        node["outputUri"] = ((status.get("output") or {}).get("uri")) or (spec.get("output") or {}).get("uri")
        node["lineageDigest"] = (record or {}).get("digest") or result.get("lineageDigest")
        if result:
            node["result"] = result
    if record is not None:
        node["lineage"] = summarize(record)
    if problems:
        node["problems"] = problems
    return node


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """The audit-relevant facts of one lineage record (not its nested input)."""
    out: dict[str, Any] = {"digest": record.get("digest"), "createdAt": record.get("createdAt"),
                           "code": record.get("code"), "configDigest": record.get("configDigest")}
    base = record.get("baseModel") or {}
    out["input"] = {"uri": base.get("uri"), "revision": base.get("revision"), "filesDigest": base.get("digest")}
    out["outputFilesDigest"] = (record.get("output") or {}).get("digest")
    if record.get("kind") == "FineTuneJob":
        ds = record.get("dataset") or {}
        out["dataset"] = {k: ds.get(k) for k in ("uri", "digest", "redactedDigest", "trainRecords", "redactions")}
        out["dataset"]["qualityPassed"] = (None if not isinstance(ds.get("quality"), dict)
                                           else not ds["quality"].get("violations"))
        out["metrics"] = {k: record.get(k) for k in ("steps", "finalLoss", "initialValidationLoss",
                                                     "finalValidationLoss", "evaluation")}
    elif record.get("kind") == "QuantizeJob":
        out["quantization"] = {k: (record.get("quantization") or {}).get(k) for k in ("method", "groupSize")}
        out["evaluationDataDigest"] = (record.get("evaluationData") or {}).get("digest")
        out["metrics"] = {"perplexity": record.get("perplexity"), "evaluation": record.get("evaluation"),
                          "size": record.get("size")}
        out["gatePassed"] = record.get("gatePassed")
    return out


def check_record(record: dict[str, Any], model_dir: Path | None = None) -> list[str]:
    """Digest problems of a record (and the records nested in it); with ``model_dir``, also
    whether the files there are still the ones the record sealed."""
    from kubeforge_runtime import lineage

    problems = lineage.verify(record)
    sealed = (record.get("output") or {}).get("digest")
    if model_dir is not None and sealed:
        now = lineage.model_files_digest(model_dir)["digest"]
        if now != sealed:
            problems.append(f"{record.get('kind')}/{record.get('name')}: the files in {model_dir} ({now}) are not "
                            f"the ones sealed ({sealed})")
    return problems


# --- building the chain ---------------------------------------------------------------------

Getter = Callable[[str, str], dict[str, Any] | None]
Lister = Callable[[str], list[dict[str, Any]]]
Records = Callable[[dict[str, Any]], tuple[dict[str, Any] | None, list[str]]]


def build_chain(kind: str, name: str, get: Getter, list_: Lister,
                records: Records = lambda obj: (None, [])) -> dict[str, Any]:
    """The tree rooted at the first resource of the chain that (kind, name) belongs to:
    ``{...node, "children": [...]}``."""
    obj = get(kind, name)
    if obj is None:
        raise AuditError(f"{kind}/{name} not found")
    seen = {_key(obj)}
    while (ref := _input_ref(obj)) is not None and ref not in seen:
        parent = get(*ref)
        if parent is None:  # waiting for an input that does not exist (yet): the chain starts here
            break
        seen.add(ref)
        obj = parent
    every = [o for k in ("QuantizeJob", "InferenceService") for o in list_(k)]

    def grow(o: dict[str, Any], visited: set[tuple[str, str]]) -> dict[str, Any]:
        record, problems = records(o)
        node = _node(o, record, problems)
        kids = [c for c in every if _input_ref(c) == _key(o) and _key(c) not in visited]
        node["children"] = [grow(c, visited | {_key(c)}) for c in sorted(kids, key=_key)]
        for child in node["children"]:
            if child["kind"] == "InferenceService":
                child["servedLineageDigest"] = node.get("lineageDigest")
                child["modelUri"] = child.get("modelUri") or node.get("outputUri")  # resolved from the reference
        return node

    return grow(obj, {_key(obj)})


def cluster_chain(kind: str, name: str, namespace: str) -> dict[str, Any]:
    from . import kube

    return build_chain(kind, name, lambda k, n: kube.get(k, namespace, n), lambda k: kube.list_(k, namespace))


def local_chain(kind: str, name: str, manifest_file: Path, workdir: Path) -> dict[str, Any]:
    """The chain of a ``kubeforge run`` of ``manifest_file`` whose workdir was ``workdir``
    (outputs under ``<workdir>/<file stem>/pvc/<claim>/...``, as the runner puts them)."""
    from .manifests import load_resources

    resources = [dict(r.raw, metadata={"namespace": r.namespace, **(r.raw.get("metadata") or {})})
                 for r in load_resources(manifest_file)]
    pvc_root = Path(workdir) / Path(manifest_file).stem / "pvc"

    def local_dir(uri: str | None) -> Path | None:
        if not uri:
            return None
        if uri.startswith("pvc://"):
            return pvc_root / uri[len("pvc://"):]
        if uri.startswith("file://"):
            return Path(uri[len("file://"):])
        return None

    def records(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
        from kubeforge_runtime import lineage

        if obj["kind"] == "InferenceService":
            return None, []
        d = local_dir(((obj.get("spec") or {}).get("output") or {}).get("uri"))
        record = lineage.read(d) if d is not None else None
        if record is None:
            return None, [f"no lineage record at {d} (has `kubeforge run` run this file with this workdir?)"]
        return record, check_record(record, d)

    def get(k: str, n: str) -> dict[str, Any] | None:
        return next((o for o in resources if _key(o) == (k, n)), None)

    tree = build_chain(kind, name, get, lambda k: [o for o in resources if o["kind"] == k], records)

    def fill_served(node: dict[str, Any]) -> None:  # an InferenceService of a plain model uri
        for child in node["children"]:
            fill_served(child)
        if node["kind"] == "InferenceService" and not node.get("servedLineageDigest"):
            d = local_dir(node.get("modelUri"))
            node["servedLineageDigest"] = ((lineage_read(d) or {}).get("digest")) if d else None

    fill_served(tree)
    return tree


def lineage_read(d: Path) -> dict[str, Any] | None:
    from kubeforge_runtime import lineage

    return lineage.read(d)


def dir_chain(output_dir: Path) -> dict[str, Any]:
    """The chain sealed in an output directory's ``kubeforge.json`` (oldest first, as a tree)."""
    from kubeforge_runtime import lineage

    record = lineage.read(output_dir)
    if record is None:
        raise AuditError(f"{output_dir} holds no readable {lineage.LINEAGE_FILE}")
    problems = check_record(record, Path(output_dir))
    tree: dict[str, Any] | None = None
    for r in lineage.chain(record):  # newest last: each becomes the only child of the one before
        node = {"kind": r.get("kind"), "name": r.get("name"), "namespace": r.get("namespace"),
                "lineageDigest": r.get("digest"), "lineage": summarize(r), "children": []}
        if r is record and problems:
            node["problems"] = problems
        if tree is None:
            tree = node
        else:
            last = tree
            while last["children"]:
                last = last["children"][0]
            last["children"].append(node)
    assert tree is not None
    return tree


# --- printing -------------------------------------------------------------------------------

def _short(digest: Any) -> str:
    return str(digest)[:19] + "…" if isinstance(digest, str) and len(digest) > 20 else str(digest)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def _lines(node: dict[str, Any], full: bool) -> list[str]:
    d = (lambda x: str(x)) if full else _short
    out: list[str] = []
    lin = node.get("lineage") or {}
    res = node.get("result") or {}
    if node["kind"] == "InferenceService":
        out.append(f"model {node.get('modelUri')}")
        out.append(f"serves lineage {d(node.get('servedLineageDigest'))}")
        return out
    if node.get("outputUri"):
        out.append(f"output {node['outputUri']}")
    if lin and not node.get("lineageDigest"):  # a base model's description (the embedded model's)
        inp = lin.get("input") or {}
        return [f"model {inp.get('uri')} revision {inp.get('revision')}",
                "unsealed description of a base model, covered by the digest of the record below"]
    out.append(f"lineage {d(node.get('lineageDigest'))}")
    if lin:
        inp = lin.get("input") or {}
        out.append(f"input {inp.get('uri')} files {d(inp.get('filesDigest'))}")
        if lin.get("dataset"):
            ds = lin["dataset"]
            red = ", ".join(f"{k}={v}" for k, v in (ds.get("redactions") or {}).items())
            out.append(f"dataset {ds.get('uri')} files {d(ds.get('digest'))}, after redaction "
                       f"{d(ds.get('redactedDigest'))}" + (f" (redacted {red})" if red else ""))
        if lin.get("evaluationDataDigest"):
            out.append(f"evaluation data {d(lin['evaluationDataDigest'])}")
        code = lin.get("code") or {}
        out.append(f"config {d(lin.get('configDigest'))}; code kubeforge {code.get('version')} "
                   f"commit {str(code.get('commit') or 'unknown')[:12]}")
        out.append(f"output files {d(lin.get('outputFilesDigest'))}")
    metrics = _metrics(node["kind"], lin.get("metrics") or {}, res, lin)
    if metrics:
        out.append(metrics)
    return out


def _metrics(kind: str, m: dict[str, Any], res: dict[str, Any], lin: dict[str, Any]) -> str:
    ev = m.get("evaluation") or res.get("evaluation") or res.get("task")
    task = f"; {ev.get('metric')} {_num(ev.get('before'))} -> {_num(ev.get('after'))}" if ev else ""
    if kind == "FineTuneJob":
        before = m.get("initialValidationLoss", res.get("initialValidationLoss"))
        after = m.get("finalValidationLoss", res.get("finalValidationLoss"))
        steps = m.get("steps", res.get("steps"))
        if steps is None and not ev:
            return ""
        loss = f", validation loss {_num(before)} -> {_num(after)}" if before is not None or after is not None else ""
        return f"metrics: {steps} steps{loss}{task}"
    ppl = m.get("perplexity") or res.get("perplexity") or {}
    gate = lin.get("gatePassed", res.get("gatePassed"))
    if not ppl and gate is None:
        return ""
    return (f"metrics: perplexity {_num(ppl.get('before'))} -> {_num(ppl.get('after'))}{task}; gate "
            + ("passed" if gate else "FAILED" if gate is False else "n/a"))


def render(tree: dict[str, Any], full_digests: bool = False) -> Any:
    """A rich Tree of the chain."""
    from rich.markup import escape
    from rich.text import Text
    from rich.tree import Tree

    def label(node: dict[str, Any]) -> str:
        phase = f" [dim]({node['phase']})[/]" if node.get("phase") else ""
        ok = "[red]✗ " + escape("; ".join(node["problems"])) + "[/]" if node.get("problems") else (
            "[green]✓ digests verified[/]" if node.get("lineage") and node.get("lineageDigest") else "")
        where = f"{node['namespace']}/" if node.get("namespace") else ""
        head = f"[bold]{node['kind']}[/] {escape(where + str(node['name']))}{phase} {ok}"
        return head + "".join("\n  " + escape(line) for line in _lines(node, full_digests))

    def text(node: dict[str, Any]) -> Text:
        return Text.from_markup(label(node), overflow="fold")  # wrap long URIs and digests, never crop

    def add(parent: Any, node: dict[str, Any]) -> None:
        branch = parent.add(text(node))
        for c in node["children"]:
            add(branch, c)

    root = Tree(text(tree), guide_style="dim")
    for c in tree["children"]:
        add(root, c)
    return root


def has_problems(tree: dict[str, Any]) -> bool:
    return bool(tree.get("problems")) or any(has_problems(c) for c in tree["children"])


def to_json(tree: dict[str, Any]) -> str:
    return json.dumps(tree, indent=2, sort_keys=False, default=str)
