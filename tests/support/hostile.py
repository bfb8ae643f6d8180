"""Generated hostile and malformed KubeForge resources, for tests/cluster/test_hostile_inputs.py.

Pure and deterministic (a fixed seed; no I/O): :func:`cases` returns the same list on every
call. Each :class:`Case` is one resource to create against the real API server with the
operator and the chart's webhook running, in one of these categories:

* ``bad-value``: every numeric, enum, boolean, pattern and map field of the three spec models,
  found by walking their JSON schema (``model_json_schema``, the CRDs' source), set below its
  minimum, above its maximum, outside its enum, or to a value of the wrong type;
* ``unknown-field``: a field the API does not define, at the spec's root and inside every
  nested object (and the snake_case spelling of a real field);
* ``hostile-template``: ``spec.template`` pass-throughs the API or the default workload
  policy refuses (hostPath/nfs/iscsi volumes, a projected serviceAccountToken, an emptyDir
  without a sizeLimit, LD_*/PYTHON* and PET_*/MASTER_*/KUBEFORGE_* env, kubeforge.io/ labels,
  AppArmor/seccomp annotations, image and serviceAccountName overrides, literal credentials);
* ``colliding-name``: a valid resource named so that one of its children would take the name
  of a foreign object the test creates first (Service, ConfigMap, NetworkPolicy, Deployment,
  Job), or whose output overlaps another job's, or whose name cannot name its children;
* ``uri``: traversal and odd URIs (``pvc://../x``, ``s3://b/../k``, NUL, unicode spaces, very
  long strings, ``file:///etc/passwd``, an output equal to the input spelled differently);
* ``reference``: references to missing, failed or malformed jobs, self-named references and
  chains of them.

``expect`` is the set of acceptable outcomes: ``refused`` (the API server or the webhook
refuses the create), ``invalid`` (admitted, then ``Accepted=False/InvalidSpec``),
``conflict`` (``Accepted=False/ChildConflict``), ``waiting`` (admitted, waiting for a
referenced job, nothing created) and ``accepted`` (a valid if odd spec: ``Accepted=True``).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

SEED = 17  # issue 17

KINDS = ("FineTuneJob", "QuantizeJob", "InferenceService")
PLURALS = {"FineTuneJob": "finetunejobs", "QuantizeJob": "quantizejobs", "InferenceService": "inferenceservices"}
SHORT = {"FineTuneJob": "ft", "QuantizeJob": "qj", "InferenceService": "is"}

REFUSED, INVALID, CONFLICT, WAITING, ACCEPTED = "refused", "invalid", "conflict", "waiting", "accepted"

# Valid base specs; each case changes one thing. A FineTuneJob is suspended, so that even an
# accepted one runs no worker pods; outputs are unique per case (the webhook refuses overlaps).
BASE: dict[str, dict[str, Any]] = {
    "FineTuneJob": {"model": {"uri": "hf://acme/tiny@main"}, "dataset": {"uri": "pvc://data/train.jsonl"},
                    "output": {"uri": "pvc://models/OUT"}, "suspend": True},
    "QuantizeJob": {"model": {"uri": "pvc://models/base"}, "output": {"uri": "pvc://models/OUT"}},
    "InferenceService": {"model": {"uri": "pvc://models/base"}},
}

# Objects the test creates before the cases (the fixtures of the colliding-name and reference
# cases). ``anchor`` writes pvc://models/anchor; ``failed-ft`` is patched to phase Failed.
ANCHOR_OUTPUT = "pvc://models/anchor"
FOREIGN_OBJECTS: list[dict[str, Any]] = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "coll-ft-svc", "labels": {"team": "billing"}},
     "spec": {"selector": {"app": "billing"}, "ports": [{"port": 80, "targetPort": 8080}]}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "coll-is-svc", "labels": {"team": "billing"}},
     "spec": {"selector": {"app": "billing"}, "ports": [{"port": 80, "targetPort": 8080}]}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coll-ft-cm-config"}, "data": {"owner": "someone"}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coll-qj-cm-quantize-config"},
     "data": {"owner": "someone"}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coll-is-cm-serve-config"},
     "data": {"owner": "someone"}},
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "coll-ft-np"},
     "spec": {"podSelector": {"matchLabels": {"app": "billing"}}, "policyTypes": ["Ingress"]}},
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "coll-is-np"},
     "spec": {"podSelector": {"matchLabels": {"app": "billing"}}, "policyTypes": ["Ingress"]}},
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "coll-is-dep"},
     "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "billing"}},
              "template": {"metadata": {"labels": {"app": "billing"}},
                           "spec": {"containers": [{"name": "c", "image": "billing:1"}]}}}},
    {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "coll-ft-job"},
     "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never",
                                                     "containers": [{"name": "c", "image": "billing:1"}]}}}},
    {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "coll-qj-job-quantize"},
     "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never",
                                                     "containers": [{"name": "c", "image": "billing:1"}]}}}},
]


@dataclass
class Case:
    category: str
    kind: str
    name: str
    spec: Any
    expect: frozenset[str]
    what: str
    labels: dict[str, str] = field(default_factory=dict)
    known_defect: str = ""
    """Set for a case that finds a defect not fixed yet: the test reports it as XFAIL (and fails
    once the case passes, so that the marker is removed)."""

    def manifest(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name}
        if self.labels:
            meta["labels"] = self.labels
        return {"apiVersion": "kubeforge.io/v1alpha1", "kind": self.kind, "metadata": meta, "spec": self.spec}


# --- the JSON schema walk ------------------------------------------------------------------

def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = defs[schema["$ref"].split("/")[-1]]
    if "anyOf" in schema:  # Optional[X]: the non-null branch (int-or-string quantities keep theirs)
        branches = [b for b in schema["anyOf"] if b.get("type") != "null"]
        if len(branches) == 1:
            merged = {k: v for k, v in schema.items() if k != "anyOf"}
            merged.update(_resolve(branches[0], defs))
            return merged
    return schema


def leaves(model: Any) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """(path of camelCase names, resolved schema) of every field of ``model``'s JSON schema."""
    root = model.model_json_schema(by_alias=True)
    defs = root.get("$defs", {})

    def walk(schema: dict[str, Any], path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
        schema = _resolve(schema, defs)
        props = schema.get("properties")
        if props:
            yield path, schema
            for name, sub in props.items():
                yield from walk(sub, (*path, name))
        elif path:
            yield path, schema

    yield from walk(root, ())


def bad_values(schema: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, value) pairs the schema must refuse."""
    out: list[tuple[str, Any]] = []
    typ = schema.get("type")
    enum = schema.get("enum") or ([schema["const"]] if "const" in schema else None)
    if schema.get("x-kubernetes-int-or-string"):
        return [("not-a-quantity", "lots"), ("wrong-type", ["1"]), ("negative-garbage", "-1Qx")]
    if enum is not None:
        if all(isinstance(e, int) for e in enum):
            return [("not-in-enum", max(enum) + 1), ("wrong-type", "big")]
        return [("not-in-enum", "Not-" + str(enum[0])), ("wrong-type", 7), ("case", str(enum[0]).upper() + "x")]
    if typ in ("integer", "number"):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        step = 1 if typ == "integer" else 0.5
        if lo is not None:
            out.append(("below-minimum", lo - step))
        if xlo is not None:
            out.append(("at-exclusive-minimum", xlo))
        if hi is not None:
            out.append(("above-maximum", hi + step))
        if xhi is not None:
            out.append(("at-exclusive-maximum", xhi))
        if typ == "integer":
            out.append(("fraction", 1.5))
            out.append(("huge", 2**63))
        out.append(("wrong-type", "12abc"))
        return out
    if typ == "boolean":
        return [("wrong-type", "yes")]
    if typ == "string":
        if "pattern" in schema:
            out.append(("pattern", "not a valid value"))
        if schema.get("minLength"):
            out.append(("empty", ""))
        if schema.get("maxLength"):
            out.append(("too-long", "a" * (schema["maxLength"] + 1)))
        out.append(("wrong-type", {"a": 1}))
        return out
    if typ == "array":
        out.append(("wrong-type", "not-a-list"))
        if "maxItems" in schema:
            item = _sample_item(schema)
            if item is not None:
                out.append(("too-many-items", [item] * (schema["maxItems"] + 1)))
        return out
    if typ == "object":
        return [("wrong-type", "not-an-object")]
    return out


def _sample_item(schema: dict[str, Any]) -> Any:
    items = schema.get("items") or {}
    if items.get("enum"):
        return items["enum"][0]
    if items.get("type") == "string":
        return "x"
    return None


def set_path(spec: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    node = out
    for key in path[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[path[-1]] = value
    return out


# Paths where the base spec must keep a valid value for a sub-object to make sense (a
# bad value there is generated from the parent: model source "exactly one of" rules).
_SKIP = {("model", "fineTuneJobRef"), ("model", "quantizeJobRef")}


def _spec_models() -> dict[str, Any]:
    from kubeforge.api import FineTuneJobSpec, InferenceServiceSpec, QuantizeJobSpec

    return {"FineTuneJob": FineTuneJobSpec, "QuantizeJob": QuantizeJobSpec, "InferenceService": InferenceServiceSpec}


# --- the categories -------------------------------------------------------------------------

def _bad_value_cases() -> Iterator[tuple[str, Any, str, frozenset[str]]]:
    for kind, model in _spec_models().items():
        for path, schema in leaves(model):
            if not path or path in _SKIP or path[0] == "template" and len(path) > 1 and path[1] in ("env",):
                continue
            if schema.get("properties"):  # an object: the wrong type only
                for label, value in (("wrong-type", "not-an-object"), ("wrong-type-list", [1])):
                    yield kind, set_path(BASE[kind], path, value), f"{'.'.join(path)}={label}", frozenset({REFUSED})
                continue
            for label, value in bad_values(schema):
                yield kind, set_path(BASE[kind], path, value), f"{'.'.join(path)}={label}", frozenset({REFUSED})


def _unknown_field_cases() -> Iterator[tuple[str, Any, str, frozenset[str]]]:
    for kind, model in _spec_models().items():
        for path, schema in leaves(model):
            if schema.get("properties") and path not in _SKIP:
                yield kind, set_path(BASE[kind], (*path, "hostileExtra"), "x"), \
                    f"{'.'.join(path) or 'spec'}.hostileExtra", frozenset({REFUSED})
        # snake_case spellings of real fields, and a status smuggled into spec
        for bad in (("max_restarts",) if kind == "FineTuneJob" else ("backoff_limit",) if kind == "QuantizeJob"
                    else ("api_key_secret_ref",)):
            yield kind, set_path(BASE[kind], (bad,), 1), f"spec.{bad} (snake_case)", frozenset({REFUSED})
        yield kind, set_path(BASE[kind], ("status",), {"phase": "Succeeded"}), "spec.status", frozenset({REFUSED})


HOSTILE_TEMPLATES: list[tuple[str, dict[str, Any]]] = [
    ("hostPath volume", {"volumes": [{"name": "host", "hostPath": {"path": "/"}}],
                         "volumeMounts": [{"name": "host", "mountPath": "/host"}]}),
    ("hostPath docker socket", {"volumes": [{"name": "sock", "hostPath": {"path": "/var/run/docker.sock"}}]}),
    ("nfs volume", {"volumes": [{"name": "n", "nfs": {"server": "10.0.0.1", "path": "/exports"}}]}),
    ("iscsi volume", {"volumes": [{"name": "i", "iscsi": {"targetPortal": "10.0.0.1:3260",
                                                             "iqn": "iqn.2001-04.com.example:storage", "lun": 0}}]}),
    ("projected serviceAccountToken", {"volumes": [{"name": "tok", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "audience": "api"}}]}}]}),
    ("emptyDir without sizeLimit", {"volumes": [{"name": "e", "emptyDir": {}}]}),
    ("volume with two sources", {"volumes": [{"name": "two", "emptyDir": {"sizeLimit": "1Gi"},
                                              "hostPath": {"path": "/etc"}}]}),
    ("LD_PRELOAD", {"env": [{"name": "LD_PRELOAD", "value": "/tmp/x.so"}]}),
    ("LD_LIBRARY_PATH", {"env": [{"name": "LD_LIBRARY_PATH", "value": "/tmp"}]}),
    ("PYTHONPATH", {"env": [{"name": "PYTHONPATH", "value": "/tmp"}]}),
    ("PYTHONSTARTUP", {"env": [{"name": "PYTHONSTARTUP", "value": "/tmp/x.py"}]}),
    ("PET_NNODES", {"env": [{"name": "PET_NNODES", "value": "64"}]}),
    ("MASTER_ADDR", {"env": [{"name": "MASTER_ADDR", "value": "evil.example.com"}]}),
    ("PET_RDZV_ENDPOINT", {"env": [{"name": "PET_RDZV_ENDPOINT", "value": "evil:29400"}]}),
    ("env value and valueFrom", {"env": [{"name": "A", "value": "x",
                                          "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}),
    ("env name with '='", {"env": [{"name": "A=B", "value": "x"}]}),
    ("literal HF_TOKEN", {"env": [{"name": "HF_TOKEN", "value": "hf_x"}]}),
    ("literal AWS_SECRET_ACCESS_KEY", {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}),
    ("reserved label kubeforge.io/", {"labels": {"kubeforge.io/finetunejob": "victim"}}),
    ("reserved label sub.kubeforge.io/", {"labels": {"serving.kubeforge.io/model": "victim"}}),
    ("AppArmor annotation", {"annotations": {"container.apparmor.security.beta.kubernetes.io/trainer": "unconfined"}}),
    ("seccomp annotation", {"annotations": {"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}}),
    ("image override", {"image": "evil/image:1"}),
    ("serviceAccountName override", {"serviceAccountName": "builder"}),
    ("image and serviceAccountName and hostPath", {"image": "evil/image:1", "serviceAccountName": "admin",
                                                   "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}),
    ("imagePullPolicy not in enum", {"imagePullPolicy": "Sometimes"}),
    ("label value of 64 characters", {"labels": {"team": "x" * 64}}),
    ("label key with a space", {"labels": {"bad key": "v"}}),
    ("annotation of 300 KB", {"annotations": {"example.com/blob": "x" * 300_000}}),
    ("env value of 300 KB", {"env": [{"name": "BLOB", "value": "x" * 300_000}]}),
    # Each part within its own bound, the whole over kopf's annotation budget: the webhook measures it.
    ("80 env values of 3 KB (240 KB in all)", {"env": [{"name": f"V{i}", "value": "x" * 3000} for i in range(80)]}),
    ("affinity of 250 KB (schemaless)", {"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": f"k{i}", "operator": "In", "values": ["v" * 1000]} for i in range(250)]}]}}}}),
    ("nodeSelector value with a slash", {"nodeSelector": {"zone": "a/b"}}),
    ("toleration with a bad operator", {"tolerations": [{"key": "k", "operator": "Sometimes"}]}),
    ("volumeMount of a volume that does not exist", {"volumeMounts": [{"name": "ghost", "mountPath": "/g"}]}),
    ("priorityClassName with capitals", {"priorityClassName": "Not_A_Name"}),
    ("privileged securityContext (unknown field)", {"securityContext": {"privileged": True}}),
    ("hostNetwork (unknown field)", {"hostNetwork": True}),
]


# Pass-throughs only the Kubernetes API can judge (label syntax, object sizes, the schemaless
# PodSpec parts): refused at admission, or an InvalidSpec condition once a child is refused.
PASSED_THROUGH = {"label value of 64 characters", "label key with a space",
                  "nodeSelector value with a slash", "toleration with a bad operator",
                  "volumeMount of a volume that does not exist", "priorityClassName with capitals"}


# Known defects the suite finds and that are not fixed yet: "template: <what>" -> why (XFAIL).
# (The 256 KiB kopf annotation budget was one: template env values and annotations are now
# bounded in the API model, and the webhook and the operator measure the whole spec.)
KNOWN_DEFECTS: dict[str, str] = {}


def _template_cases() -> Iterator[tuple[str, Any, str, frozenset[str]]]:
    for kind in KINDS:
        for what, template in HOSTILE_TEMPLATES:
            yield kind, set_path(BASE[kind], ("template",), template), f"template: {what}", \
                frozenset({REFUSED, INVALID}) if what in PASSED_THROUGH else frozenset({REFUSED})
    # The reserved env names, one per kind (the full list lives in kubeforge_runtime.contract).
    from kubeforge_runtime import contract

    for i, name in enumerate(sorted(contract.RESERVED_ENV)):
        kind = KINDS[i % 3]
        yield kind, set_path(BASE[kind], ("template",), {"env": [{"name": name, "value": "1"}]}), \
            f"template.env {name}", frozenset({REFUSED})


UNICODE_SPACE = "\u00a0"   # no-break space: whitespace to Python, not to RE2 (\S of the CRD's pattern)
RTL_OVERRIDE = "\u202e"

# (field path, value, expect) per kind; an output-like field of a job keeps unique values.
_URIS_BAD = [
    "pvc://../x", "pvc://./x", "pvc:///etc/passwd", "s3://../k", "s3://B/k", "hf://../../etc", "hf://a/b/../c@x",
    "file://etc/passwd", "file:/etc/passwd", "http://169.254.169.254/latest/meta-data", "ftp://host/x",
    "gs://bucket/x", "pvc://models/a b", "pvc://models/x\n", "pvc://models/x\u0000", "", " pvc://models/x",
    "PVC://models/x", "javascript:alert(1)", "\\\\server\\share", "pvc://models/x\x1b[2J", "pvc://models/x\r",
]


def _uri_cases() -> Iterator[tuple[str, Any, str, frozenset[str]]]:
    n = 0
    for kind, path in (("FineTuneJob", ("model", "uri")), ("FineTuneJob", ("dataset", "uri")),
                       ("FineTuneJob", ("output", "uri")), ("QuantizeJob", ("model", "uri")),
                       ("QuantizeJob", ("output", "uri")), ("InferenceService", ("model", "uri"))):
        for uri in _URIS_BAD:
            n += 1
            yield kind, set_path(BASE[kind], path, uri), f"{'.'.join(path)}={uri!r}", frozenset({REFUSED})
    # Admitted by the CRD's RE2 pattern, refused by the operator's (Unicode-aware) model: a
    # condition. (Or by the webhook, should it ever validate the model.)
    for kind, path in (("FineTuneJob", ("model", "uri")), ("QuantizeJob", ("model", "uri")),
                       ("InferenceService", ("model", "uri"))):
        yield kind, set_path(BASE[kind], path, f"pvc://models/a{UNICODE_SPACE}b"), \
            f"{'.'.join(path)} with a no-break space", frozenset({REFUSED, INVALID})
    # Odd but valid: accepted, and the operator explains nothing is wrong (Accepted=True).
    odd_valid = [
        ("InferenceService", ("model", "uri"), "file:///etc/passwd"),
        ("InferenceService", ("model", "uri"), "pvc://models/../../x"),
        ("InferenceService", ("model", "uri"), f"pvc://models/{RTL_OVERRIDE}gpj.exe"),
        ("InferenceService", ("model", "uri"), "pvc://models/" + "\u00e9\u4e2d\u6587" * 10),
        ("FineTuneJob", ("dataset", "uri"), "file:///etc/passwd"),
        ("FineTuneJob", ("output", "uri"), "s3://b/../k"),
        ("QuantizeJob", ("model", "uri"), "s3://b/../k"),
    ]
    for kind, path, uri in odd_valid:
        yield kind, set_path(BASE[kind], path, uri), f"{'.'.join(path)}={uri!r} (odd, valid)", \
            frozenset({ACCEPTED, REFUSED, INVALID})
    # Very long strings: the schema's maxLength, or the API server's request limit (4 MB).
    for kind, path, size in (("InferenceService", ("model", "uri"), 300_000),
                             ("QuantizeJob", ("model", "uri"), 300_000),
                             ("FineTuneJob", ("dataset", "uri"), 300_000),
                             ("InferenceService", ("model", "uri"), 4_000_000)):
        yield kind, set_path(BASE[kind], path, "pvc://models/" + "a" * size), \
            f"{'.'.join(path)} of {size} characters", frozenset({REFUSED})
    # A QuantizeJob whose output is its input, spelled differently (no CEL twin: the operator).
    for model_uri, out_uri in (("pvc://models/base", "pvc://models/base/"),
                               ("pvc://models/base", "pvc://models/./base"),
                               ("pvc://models/base", "pvc://models/x/../base"),
                               ("pvc://models/base", "pvc://models//base"),
                               ("pvc://models/base/sub", "pvc://models/base"),
                               ("pvc://models/base", "pvc://models/base/q"),
                               ("file:///models/base", "file:/models/base"),
                               ("s3://b/m", "s3://b/m/../m/")):
        yield "QuantizeJob", {"model": {"uri": model_uri}, "output": {"uri": out_uri}}, \
            f"output {out_uri!r} overlaps model {model_uri!r}", frozenset({REFUSED, INVALID})


def _collision_cases() -> Iterator[tuple[str, str | None, Any, str, frozenset[str]]]:
    """(kind, fixed name or None, spec, what, expect)."""
    C = frozenset({CONFLICT})
    for name, what in (("coll-ft-svc", "Service"), ("coll-ft-cm", "ConfigMap <name>-config"),
                       ("coll-ft-np", "NetworkPolicy"), ("coll-ft-job", "Job")):
        yield "FineTuneJob", name, BASE["FineTuneJob"], f"named like a foreign {what}", C
    for name, what in (("coll-qj-cm", "ConfigMap <name>-quantize-config"), ("coll-qj-job", "Job <name>-quantize")):
        yield "QuantizeJob", name, BASE["QuantizeJob"], f"named like a foreign {what}", C
    for name, what in (("coll-is-svc", "Service"), ("coll-is-cm", "ConfigMap <name>-serve-config"),
                       ("coll-is-np", "NetworkPolicy"), ("coll-is-dep", "Deployment")):
        yield "InferenceService", name, BASE["InferenceService"], f"named like a foreign {what}", C
    # Outputs overlapping the anchor FineTuneJob's, however spelled: the webhook refuses.
    for out in (ANCHOR_OUTPUT, ANCHOR_OUTPUT + "/", ANCHOR_OUTPUT + "/sub", "pvc://models/x/../anchor",
                "pvc://models//anchor", "pvc://models/./anchor", "pvc://models"):
        yield "FineTuneJob", None, set_path(BASE["FineTuneJob"], ("output", "uri"), out), \
            f"output {out!r} overlaps the anchor's", frozenset({REFUSED})
        yield "QuantizeJob", None, set_path(BASE["QuantizeJob"], ("output", "uri"), out), \
            f"output {out!r} overlaps the anchor's", frozenset({REFUSED})
    yield "FineTuneJob", None, set_path(BASE["FineTuneJob"], ("checkpoint", "uri"), ANCHOR_OUTPUT + "/ckpt"), \
        "checkpoint.uri inside the anchor's output", frozenset({REFUSED})
    # Names the kind's children cannot carry.
    for kind, name in (("FineTuneJob", "a.b"), ("FineTuneJob", "9lives"), ("FineTuneJob", "f" * 53),
                       ("InferenceService", "9lives-is"), ("InferenceService", "a.b-is"),
                       ("InferenceService", "s" * 64), ("QuantizeJob", "q" * 254), ("QuantizeJob", "Upper"),
                       ("InferenceService", "kubernetes")):
        yield kind, name, BASE[kind], f"metadata.name {name[:12]!r}{'...' if len(name) > 12 else ''}", \
            frozenset({REFUSED, INVALID}) if name != "kubernetes" else frozenset({ACCEPTED})
    # An adapter named like the service itself, and duplicates.
    yield "InferenceService", "self-adapter", {**BASE["InferenceService"],
                                               "adapters": [{"name": "self-adapter", "uri": "pvc://m/a"}]}, \
        "adapter named like the service", frozenset({REFUSED})
    yield "InferenceService", None, {**BASE["InferenceService"], "adapters": [
        {"name": "a", "uri": "pvc://m/a"}, {"name": "a", "uri": "pvc://m/b"}]}, "duplicate adapter names", \
        frozenset({REFUSED})


def _reference_cases() -> Iterator[tuple[str, str | None, Any, str, frozenset[str]]]:
    W = frozenset({WAITING})
    yield "QuantizeJob", None, {"model": {"fineTuneJobRef": {"name": "missing-ft"}}, "output": {"uri": "pvc://m/OUT"}}, \
        "fineTuneJobRef to a missing job", W
    yield "QuantizeJob", "self-ref", {"model": {"fineTuneJobRef": {"name": "self-ref"}},
                                      "output": {"uri": "pvc://m/OUT"}}, "fineTuneJobRef to its own name", W
    yield "InferenceService", "self-ref-is", {"model": {"quantizeJobRef": {"name": "self-ref-is"}}}, \
        "quantizeJobRef to its own name", W
    yield "InferenceService", None, {"model": {"fineTuneJobRef": {"name": "missing-ft"}}}, \
        "fineTuneJobRef to a missing job", W
    # A chain: IS -> QJ chain-q (waiting) -> FT chain-f (missing).
    yield "QuantizeJob", "chain-q", {"model": {"fineTuneJobRef": {"name": "chain-f"}}, "output": {"uri": "pvc://m/OUT"}}, \
        "chain: QuantizeJob -> missing FineTuneJob", W
    yield "InferenceService", "chain-is", {"model": {"quantizeJobRef": {"name": "chain-q"}}}, \
        "chain: InferenceService -> waiting QuantizeJob -> missing FineTuneJob", W
    # A QuantizeJob referencing an invalid (never running) FineTuneJob: waits, and says for what.
    yield "QuantizeJob", None, {"model": {"fineTuneJobRef": {"name": "invalid-ft"}}, "output": {"uri": "pvc://m/OUT"}}, \
        "fineTuneJobRef to an invalid FineTuneJob", W
    yield "InferenceService", None, {"model": {"fineTuneJobRef": {"name": "anchor"}}}, \
        "fineTuneJobRef to a suspended FineTuneJob", W
    # Refused: references to a Failed job, malformed references, both uri and a reference.
    for kind in ("QuantizeJob", "InferenceService"):
        extra = {"output": {"uri": "pvc://m/OUT"}} if kind == "QuantizeJob" else {}
        yield kind, None, {"model": {"fineTuneJobRef": {"name": "failed-ft"}}, **extra}, \
            "fineTuneJobRef to a Failed job", frozenset({REFUSED})
        for ref in ("../x", "", "X", "a" * 64, "a/b", "a\u0000b"):
            yield kind, None, {"model": {"fineTuneJobRef": {"name": ref}}, **extra}, \
                f"fineTuneJobRef name {ref[:10]!r}", frozenset({REFUSED})
        yield kind, None, {"model": {"fineTuneJobRef": {"name": "x", "namespace": "kube-system"}}, **extra}, \
            "fineTuneJobRef into another namespace", frozenset({REFUSED})
        yield kind, None, {"model": {"uri": "pvc://m/x", "fineTuneJobRef": {"name": "x"}}, **extra}, \
            "uri and fineTuneJobRef", frozenset({REFUSED})
        yield kind, None, {"model": {}, **extra}, "model with no source", frozenset({REFUSED})
        yield kind, None, {"model": {"fineTuneJobRef": "anchor"}, **extra}, "fineTuneJobRef as a string", \
            frozenset({REFUSED})
    yield "InferenceService", None, {"model": {"quantizeJobRef": {"name": "a"}, "fineTuneJobRef": {"name": "b"}}}, \
        "two references", frozenset({REFUSED})
    yield "QuantizeJob", None, {"model": {"quantizeJobRef": {"name": "a"}}, "output": {"uri": "pvc://m/OUT"}}, \
        "quantizeJobRef on a QuantizeJob (a cycle the API cannot express)", frozenset({REFUSED})
    yield "FineTuneJob", None, {**BASE["FineTuneJob"], "model": {"fineTuneJobRef": {"name": "anchor"}}}, \
        "fineTuneJobRef on a FineTuneJob", frozenset({REFUSED})
    # Whole-spec shapes.
    for kind in KINDS:
        yield kind, None, None, "spec null", frozenset({REFUSED})
        yield kind, None, [], "spec a list", frozenset({REFUSED})
        yield kind, None, "x", "spec a string", frozenset({REFUSED})
        yield kind, None, {}, "spec empty", frozenset({REFUSED})


def cases() -> list[Case]:
    """Every case, in a fixed order, with unique names (``h<index>-<kind>``) unless fixed."""
    rng = random.Random(SEED)
    raw: list[tuple[str, str, str | None, Any, str, frozenset[str]]] = []
    raw += [("bad-value", k, None, s, w, e) for k, s, w, e in _bad_value_cases()]
    raw += [("unknown-field", k, None, s, w, e) for k, s, w, e in _unknown_field_cases()]
    raw += [("hostile-template", k, None, s, w, e) for k, s, w, e in _template_cases()]
    raw += [("uri", k, None, s, w, e) for k, s, w, e in _uri_cases()]
    raw += [("colliding-name", k, n, s, w, e) for k, n, s, w, e in _collision_cases()]
    raw += [("reference", k, n, s, w, e) for k, n, s, w, e in _reference_cases()]
    out = []
    for i, (category, kind, name, spec, what, expect) in enumerate(raw):
        defect = next((reason for key, reason in KNOWN_DEFECTS.items() if what == f"template: {key}"), "")
        spec = copy.deepcopy(spec)
        if isinstance(spec, dict) and isinstance(spec.get("output"), dict) and \
                spec["output"].get("uri") in ("pvc://models/OUT", "pvc://m/OUT"):
            spec["output"]["uri"] = f"pvc://out/h{i:03d}"  # unique: no overlap between cases
        out.append(Case(category, kind, name or f"h{i:03d}-{SHORT[kind]}", spec, expect, what, known_defect=defect))
    rng.shuffle(out)  # interleave categories and kinds, deterministically
    return out


# Objects created before the cases: the anchor (valid, suspended), a job patched to Failed,
# a FineTuneJob the operator marks invalid (a Unicode space in its model URI).
PRE_RESOURCES: list[dict[str, Any]] = [
    {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "anchor"},
     "spec": {**BASE["FineTuneJob"], "output": {"uri": ANCHOR_OUTPUT}}},
    {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "failed-ft"},
     "spec": {**BASE["FineTuneJob"], "output": {"uri": "pvc://models/failed"}}},
    {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "invalid-ft"},
     "spec": {**BASE["FineTuneJob"], "output": {"uri": "pvc://models/invalid"},
              "model": {"uri": f"pvc://models/a{UNICODE_SPACE}b"}}},
]
