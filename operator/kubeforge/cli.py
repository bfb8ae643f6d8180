"""The ``kubeforge`` command line.

  kubeforge version              versions of KubeForge and the API it serves
  kubeforge crds                 print the CRDs (``kubeforge crds | kubectl apply -f -``)
  kubeforge operator             run the operator against the current kubeconfig / cluster
  kubeforge validate -f FILE     check resources against the API models, offline

The heavy imports (kopf, kubernetes) happen inside the commands that need them, so
``kubeforge --help`` is fast and works with only the base install.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

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
    run_operator(namespaces, liveness_port=args.liveness_port, standalone=args.standalone,
                 peering=args.peering, verbose=args.verbose)
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
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_operator)

    p = sub.add_parser("validate", help="validate KubeForge resources in a YAML file, offline")
    p.add_argument("-f", "--filename", required=True)
    p.set_defaults(func=_cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
