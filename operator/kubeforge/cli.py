"""The ``kubeforge`` command line.

  kubeforge version              versions of KubeForge and the API it serves
  kubeforge crds                 print the CRDs (``kubeforge crds | kubectl apply -f -``)
  kubeforge operator             run the operator against the current kubeconfig / cluster
  kubeforge validate -f FILE     check resources against the API models and the fit check, offline
  kubeforge plan -f FILE         the fit check's memory estimate per GPU and the layouts around it
  kubeforge run -f FILE          run resources locally, no cluster (fine-tune -> quantize -> serve)
  kubeforge data check FILE      measure a JSONL training file against the data red lines
  kubeforge audit KIND/NAME      the lineage chain FineTuneJob -> QuantizeJob -> InferenceService
                                 (cluster; or -f FILE --workdir DIR after `kubeforge run`; or
                                 --dir OUTPUT_DIR for one output's kubeforge.json)

``kubeforge data check`` uses the runtime's own check (``kubeforge_runtime.datacheck``, the code
the FineTuneJob preflight runs), imported inside the command; it needs no torch, except that
``--tokenizer`` (and so ``--max-overlong-share``) needs transformers, the ``runtime`` extra.

The heavy imports (kopf, kubernetes) happen inside the commands that need them, so
``kubeforge --help`` is fast and works with only the base install.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, Sequence

from . import __version__


def _cmd_version(args: argparse.Namespace) -> int:
    from .api import API_VERSION

    print(f"kubeforge {__version__} (API {API_VERSION})")
    return 0


def _cmd_crds(args: argparse.Namespace) -> int:
    from .api.crd import render_all

    sys.stdout.write(render_all())
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    from .controllers.runner import run_operator

    namespaces = args.namespace or [n for n in os.environ.get("KUBEFORGE_NAMESPACES", "").split(",") if n]
    webhook = None
    if args.webhook_port:
        from .controllers.runner import WebhookOptions

        webhook = WebhookOptions(port=args.webhook_port, cert_file=args.webhook_cert_file,
                                 key_file=args.webhook_key_file, addr=args.webhook_addr,
                                 host=args.webhook_host, cert_check_seconds=args.webhook_cert_check_seconds)
    run_operator(namespaces, liveness_port=args.liveness_port, standalone=args.standalone,
                 peering=args.peering, verbose=args.verbose, peering_priority=args.peering_priority,
                 peering_lifetime=args.peering_lifetime, webhook=webhook, metrics_port=args.metrics_port)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .manifests import ManifestError, load_resources

    try:
        resources = load_resources(args.filename)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from . import fit

    failed = False
    for res in resources:
        try:
            report = fit.check(res.kind, res.spec.to_api())
        except ValueError as exc:
            print(f"error: {res.kind}/{res.name}: spec.{exc}", file=sys.stderr)
            failed = True
            continue
        if report.checked and not report.fits:
            print(f"error: {res.kind}/{res.name}: {report.message}", file=sys.stderr)
            failed = True
            continue
        print(f"{res.kind}/{res.name}: valid" + (f" (estimated peak {fit.gib(report.estimate.peak)} per GPU)"
                                                  if report.checked and report.estimate else ""))
    return 1 if failed else 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .manifests import ManifestError, load_resources
    from .plan import render_plans

    try:
        resources = load_resources(args.filename)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return render_plans(resources, limit=args.gpu_memory, count=args.alternatives)


def _cmd_run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from .local.runner import LocalRunError, LocalRunner
    from .manifests import ManifestError

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    runner = LocalRunner(
        workdir=Path(args.workdir) / Path(args.filename).stem,
        seed_volumes=Path(args.volumes) if args.volumes else None,
        model_dir=Path(args.model) if args.model else None,
    )
    # SIGTERM ends the run as Ctrl-C does: run_file's cleanup then stops every local pod
    # (each runs in a process group of its own, which no signal to this process reaches).
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        runner.run_file(Path(args.filename), keep_serving=args.serve)
    except (LocalRunError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except _Terminated:
        print("stopped (SIGTERM); every local pod was stopped", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("stopped (Ctrl-C); every local pod was stopped", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


class _Terminated(Exception):
    """SIGTERM arrived during ``kubeforge run``."""


def _raise_terminated(signum: int, _frame: Any) -> None:
    raise _Terminated()


_DATA_THRESHOLDS = (  # (flag, spec name, type)
    ("--max-unparseable-share", "maxUnparseableShare", float),
    ("--max-duplicate-share", "maxDuplicateShare", float),
    ("--max-label-imbalance", "maxLabelImbalance", float),
    ("--min-records", "minRecords", int),
    ("--max-overlong-share", "maxOverlongShare", float),
    ("--max-pii-share", "maxPiiShare", float),
)


def _load_tokenizer(where: str) -> object:
    """A tokenizer directory (tokenizer_config.json), else a model directory or URI as the
    trainer resolves it (an adapter falls back to its base's tokenizer)."""
    from pathlib import Path

    if (Path(where) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(where)
    from kubeforge_runtime.models import load_tokenizer

    return load_tokenizer(where)


def _cmd_data_check(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from kubeforge_runtime import data, datacheck

    thresholds = {name: getattr(args, flag[2:].replace("-", "_")) for flag, name, _ in _DATA_THRESHOLDS}
    if thresholds["maxOverlongShare"] is not None and not args.tokenizer:
        print("error: --max-overlong-share needs --tokenizer DIR (token lengths are the tokenizer's)", file=sys.stderr)
        return 2
    if thresholds["maxLabelImbalance"] is not None and args.format == "text":
        print("error: --max-label-imbalance needs labels: --format prompt-completion or chat", file=sys.stderr)
        return 2
    tokenizer = None
    if args.tokenizer:
        try:
            tokenizer = _load_tokenizer(args.tokenizer)
        except ImportError as exc:  # the base install: no transformers
            print(f"error: --tokenizer needs the runtime extra (pip install 'kubeforge[runtime]'): {exc}",
                  file=sys.stderr)
            return 2
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: models.ModelLoadError
            print(f"error: --tokenizer {args.tokenizer}: {exc}", file=sys.stderr)
            return 2
    try:
        report = datacheck.check_file(args.file, args.format, thresholds, tokenizer=tokenizer,
                                      sequence_length=args.sequence_length if tokenizer is not None else None)
    except data.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"file": report.file, "format": report.format, **report.result()}, indent=2))
        return 0 if report.passed else 1
    failed = {v.check for v in report.violations}
    m = report.measurements.to_dict()
    table = Table(title=f"{report.file} ({report.format})")
    for col in ("check", "measured", "threshold", "result"):
        table.add_column(col, justify="right" if col in ("measured", "threshold") else "left")
    rows = [("records", "records", "minRecords"),
            ("unparseable share", "unparseableShare", "maxUnparseableShare"),
            ("duplicate share", "duplicateShare", "maxDuplicateShare"),
            ("label imbalance", "labelImbalance", "maxLabelImbalance"),
            ("overlong share", "overlongShare", "maxOverlongShare"),
            ("personal-data share", "piiShare", "maxPiiShare")]
    for label, key, limit_name in rows:
        limit = report.thresholds.get(limit_name)
        verdict = "[red]FAIL[/red]" if limit_name in failed else ("[green]pass[/green]" if limit is not None else "-")
        value = m.get(key)
        shown = "n/a" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
        table.add_row(label, shown, "-" if limit is None else f"{limit:.6g}", verdict)
    console = Console(soft_wrap=True)  # paths and messages stay whole lines (grep-able)
    console.print(table)
    details = [f"{m['unparseableRecords']} unparseable line(s)", f"{m['duplicateRecords']} duplicate(s) "
               f"({m['exactDuplicateRecords']} exact)"]
    if "labelClasses" in m:
        details.append(f"{m['labelClasses']} label(s)")
    if "overlongRecords" in m:
        details.append(f"{m['overlongRecords']} record(s) over {m['sequenceLength']} tokens")
    if "piiRecords" in m:
        details.append(f"{m['piiRecords']} record(s) with personal data")
    console.print(", ".join(details), highlight=False)
    for line in report.errors:
        console.print(line, highlight=False, markup=False)
    if m["unparseableRecords"] and "maxUnparseableShare" not in report.thresholds:
        console.print("note: a FineTuneJob without dataset.checks.maxUnparseableShare fails on any bad line",
                      highlight=False, markup=False)
    if not report.passed:
        console.print(report.message(), style="red", highlight=False, markup=False)
        return 1
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from . import audit

    try:
        if args.dir:
            tree = audit.dir_chain(Path(args.dir))
        elif not args.ref:
            raise audit.AuditError("give KIND/NAME (or --dir OUTPUT_DIR)")
        elif args.filename:
            tree = audit.local_chain(*audit.parse_ref(args.ref), Path(args.filename), Path(args.workdir))
        else:
            from .kube import load_config

            load_config()
            tree = audit.cluster_chain(*audit.parse_ref(args.ref), args.namespace)
    except audit.AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(audit.to_json(tree))
    else:
        console = Console(highlight=False)
        if not console.is_terminal:  # piped or captured: one line per fact, digests whole
            console = Console(highlight=False, width=1000)
        console.print(audit.render(tree, full_digests=args.full))
    return 1 if audit.has_problems(tree) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubeforge",
        description="KubeForge: fine-tune, compress and serve LLMs on Kubernetes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("version", help="print versions")
    p.set_defaults(func=_cmd_version)

    p = sub.add_parser("crds", help="print the CustomResourceDefinitions as YAML")
    p.set_defaults(func=_cmd_crds)

    p = sub.add_parser("operator", help="run the operator (kopf) against the current cluster")
    p.add_argument("-n", "--namespace", action="append",
                   help="watch only this namespace (repeatable; default: all, or $KUBEFORGE_NAMESPACES)")
    p.add_argument("--liveness-port", type=int, default=None, help="serve /healthz on this port")
    p.add_argument("--standalone", action="store_true", help="no peering: assume the only operator")
    p.add_argument("--peering", default=None, help="kopf peering name for HA (one active replica)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--peering-priority", type=int, default=None,
                   help="peering priority (default: lower the later this replica started, so the oldest is active)")
    p.add_argument("--peering-lifetime", type=int, default=None,
                   help="seconds before a silent peer counts as dead and a standby takes over (kopf default 60)")
    p.add_argument("--webhook-port", type=int, default=None,
                   help="serve the validating admission webhook over HTTPS on this port")
    p.add_argument("--webhook-cert-file", default=None, help="PEM certificate of the webhook server")
    p.add_argument("--webhook-key-file", default=None, help="PEM private key of the webhook server")
    p.add_argument("--webhook-addr", default="0.0.0.0", help="address the webhook server listens on")
    p.add_argument("--webhook-host", default=None, help="host name the webhook server is reached by")
    p.add_argument("--webhook-cert-check-seconds", type=float, default=10.0,
                   help="how often the webhook server re-reads its certificate files; a renewed certificate "
                        "is served from the next check on, without a restart")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_operator)

    p = sub.add_parser("validate", help="validate KubeForge resources in a YAML file, offline")
    p.add_argument("-f", "--filename", required=True)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plan", help="print the fit check's memory estimate per GPU and alternative layouts",
                       description="For each FineTuneJob and InferenceService in FILE: the estimated peak memory "
                       "per GPU by term, the limit (resources.gpuMemory, the nodeSelector's nvidia.com/gpu.memory, "
                       "or --gpu-memory) and, for training, the nearest alternative layouts with their estimates. "
                       "Exit 0: everything fits or no limit is known; 1: something does not fit.")
    p.add_argument("-f", "--filename", required=True)
    p.add_argument("--gpu-memory", default=None, help="compare with this memory per GPU (e.g. 24Gi) when the spec "
                   "gives none")
    p.add_argument("--alternatives", type=int, default=8, help="alternative layouts shown (default 8)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("run", help="run resources locally, no cluster (fine-tune -> quantize -> serve)")
    p.add_argument("-f", "--filename", required=True, help="YAML with one or more KubeForge resources")
    p.add_argument("--workdir", default="kubeforge-runs", help="where pvc:// volumes, logs and outputs go")
    p.add_argument("--volumes", default=None,
                   help="seed pvc://<claim> from DIR/<claim> (default: a volumes/ directory next to the file)")
    p.add_argument("--model", default=None, help="copy this model directory to model paths that do not exist "
                   "(default: build a tiny Llama-style model there)")
    p.add_argument("--serve", action="store_true", help="keep the InferenceService running after the sample request")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = data_sub.add_parser(
        "check", help="measure a JSONL file against the data red lines (spec.dataset.checks)",
        description="Measure a JSONL training file as the FineTuneJob preflight does (unparseable, duplicate and "
        "overlong shares, label imbalance, records) and judge it against the thresholds given. Exit 0: "
        "no line crossed; 1: a line crossed; 2: the file or the options are unusable.")
    p.add_argument("file", help="JSONL file")
    p.add_argument("--format", choices=("text", "prompt-completion", "chat"), default=None,
                   help="record format (default: detected from the first record)")
    p.add_argument("--sequence-length", type=int, default=512, help="tokens per sequence (overlong: longer than this)")
    p.add_argument("--tokenizer", default=None,
                   help="model or tokenizer directory, to measure token lengths (needs the runtime extra)")
    for flag, name, typ in _DATA_THRESHOLDS:
        p.add_argument(flag, type=typ, default=None, metavar="N", help=f"fail above (minRecords: below) N ({name})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_data_check)

    p = sub.add_parser(
        "audit", help="print the lineage chain FineTuneJob -> QuantizeJob -> InferenceService",
        description="Print the lineage chain that KIND/NAME belongs to: each output's lineage digest, the digests "
        "of its inputs (base model files, dataset after redaction, config), code version, metrics and gate. From "
        "the cluster by default; with -f FILE from a `kubeforge run` of FILE (outputs under --workdir); with --dir "
        "from one output directory's kubeforge.json. Exit 0: all shown; 1: a digest does not match; 2: not found.")
    p.add_argument("ref", nargs="?", help="finetunejob/NAME, quantizejob/NAME or inferenceservice/NAME")
    p.add_argument("-n", "--namespace", default="default", help="namespace on the cluster (default: default)")
    p.add_argument("-f", "--filename", default=None, help="audit a local run of this YAML instead of the cluster")
    p.add_argument("--workdir", default="kubeforge-runs", help="the --workdir that `kubeforge run` used")
    p.add_argument("--dir", default=None, help="audit one output directory (its kubeforge.json), offline")
    p.add_argument("--full", action="store_true", help="print digests in full")
    p.add_argument("--json", action="store_true", help="print the chain as JSON")
    p.set_defaults(func=_cmd_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
