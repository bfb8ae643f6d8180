"""The ``kubeforge`` command line.

  kubeforge version              versions of KubeForge and the API it serves
  kubeforge crds                 print the CRDs (``kubeforge crds | kubectl apply -f -``)
  kubeforge operator             run the operator against the current kubeconfig / cluster
  kubeforge validate -f FILE     check resources against the API models, offline
  kubeforge run -f FILE          run resources locally, no cluster (fine-tune -> quantize -> serve)

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
                                 host=args.webhook_host)
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
    for res in resources:
        print(f"{res.kind}/{res.name}: valid")
    return 0


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
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_operator)

    p = sub.add_parser("validate", help="validate KubeForge resources in a YAML file, offline")
    p.add_argument("-f", "--filename", required=True)
    p.set_defaults(func=_cmd_validate)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
