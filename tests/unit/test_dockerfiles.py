"""Lint of the two Dockerfiles: the rules that matter, checked by parsing them.

No Dockerfile linter is installable here (hadolint is Haskell; no Docker engine), so this
module parses the Dockerfiles itself and enforces: base images only through build ARGs whose
defaults carry an explicit, non-latest tag and no registry host; a numeric non-root USER for
everything after the last RUN; no ADD (so no remote URLs); apt and pip without caches;
exec-form ENTRYPOINT/CMD; COPY sources that exist and that the .dockerignore lets through;
and agreement with the code: the runtime image's entry points exist as runnable modules, its
user is the one the operator's pods run as, its ports are the contract's, and the operator
image's command line parses.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubeforge.builders import common
from kubeforge.cli import build_parser
from kubeforge_runtime import contract
from support.chart import render

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "operator" / "Dockerfile"
RUNTIME = REPO / "trainer_image" / "Dockerfile"
DOCKERFILES = [OPERATOR, RUNTIME]


@dataclass
class Instruction:
    cmd: str
    args: str
    line: int


def parse(path: Path) -> list[Instruction]:
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comments inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, args = buf.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip(), start))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def stages(instrs: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for i in instrs:
        if i.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(i)
    return result


def global_args(instrs: list[Instruction]) -> dict[str, str]:
    out = {}
    for i in instrs:
        if i.cmd == "FROM":
            break
        if i.cmd == "ARG":
            name, _, default = i.args.partition("=")
            out[name] = default
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_come_from_pinned_args_without_registry_host(path):
    instrs = parse(path)
    args = global_args(instrs)
    names = set()
    for i in instrs:
        if i.cmd != "FROM":
            continue
        image, *rest = i.args.split()
        m = re.fullmatch(r"\$\{(\w+)\}", image)
        assert m or image in names, f"{path.name}:{i.line}: FROM {image}: use a build ARG (or an earlier stage)"
        if m:
            default = args.get(m.group(1))
            assert default, f"{path.name}: ARG {m.group(1)} needs a default before the first FROM"
            repo, _, tag = default.rpartition(":")
            assert repo and "/" not in tag and tag and tag != "latest", f"{default}: pin an explicit tag"
            first = default.split("/")[0]  # a registry host, when it has a dot or a port
            has_host = "/" in default and ("." in first or ":" in first or first == "localhost")
            assert not has_host, f"{default}: no registry host in the repository (pass a mirror with --build-arg)"
        if len(rest) == 2 and rest[0].upper() == "AS":
            names.add(rest[1])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_final_stage_runs_as_numeric_non_root_user(path):
    final = stages(parse(path))[-1]
    users = [i for i in final if i.cmd == "USER"]
    assert users, f"{path.name}: the final stage sets no USER (it would run as root)"
    uid = users[-1].args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER must be a numeric non-root UID (runAsNonRoot)"
    last_run = max((i.line for i in final if i.cmd == "RUN"), default=0)
    assert users[-1].line > last_run, f"{path.name}: nothing may run as root after USER"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_no_add_no_remote_fetches_no_caches(path):
    for i in parse(path):
        assert i.cmd != "ADD", f"{path.name}:{i.line}: use COPY (ADD fetches URLs and unpacks archives)"
        if i.cmd != "RUN":
            continue
        assert not re.search(r"(curl|wget)[^|]*\|\s*(sh|bash)", i.args), f"{path.name}:{i.line}: piped installer"
        assert "sudo " not in i.args and "chmod 777" not in i.args
        if "apt-get install" in i.args:
            assert "--no-install-recommends" in i.args and "-y" in i.args, f"{path.name}:{i.line}"
            assert "rm -rf /var/lib/apt/lists" in i.args, f"{path.name}:{i.line}: clean the apt lists in the same RUN"
        if "apt-get update" in i.args:
            assert "apt-get install" in i.args, f"{path.name}:{i.line}: update and install in one RUN"
        if "pip install" in i.args:
            assert "--no-cache-dir" in i.args, f"{path.name}:{i.line}: pip install --no-cache-dir"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_copy_sources_exist_and_pass_the_dockerignore(path):
    ignore = Path(f"{path}.dockerignore")
    assert ignore.exists(), f"{ignore.name} missing: the context is the repository root"
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]

    def included(rel: str) -> bool:
        keep = True
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/"):
                keep = neg
        return keep

    instrs = parse(path)
    stage_names = {i.args.split()[-1] for i in instrs if i.cmd == "FROM" and " AS " in i.args.upper()}
    for i in instrs:
        if i.cmd != "COPY":
            continue
        parts = shlex.split(i.args)
        if any(p.startswith("--from=") for p in parts):
            assert parts[0].split("=", 1)[1] in stage_names
            continue
        for src in [p for p in parts if not p.startswith("--")][:-1]:
            assert (REPO / src).exists(), f"{path.name}:{i.line}: COPY {src}: no such path in the repository"
            assert included(src.rstrip("/")), f"{path.name}:{i.line}: {src} is excluded by {ignore.name}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_exec_form_entrypoint_and_absolute_workdir(path):
    for i in parse(path):
        if i.cmd in ("ENTRYPOINT", "CMD"):
            assert isinstance(json.loads(i.args), list), f"{path.name}:{i.line}: exec form (signals reach PID 1)"
        if i.cmd == "WORKDIR":
            assert i.args.startswith("/")


def test_runtime_image_entry_points_exist_and_match_the_operator():
    instrs = parse(RUNTIME)
    label = next(i for i in stages(instrs)[-1] if i.cmd == "LABEL" and "io.kubeforge.entrypoints" in i.args)
    modules = re.search(r'io\.kubeforge\.entrypoints="([^"]+)"', label.args).group(1).split()
    assert modules == ["kubeforge_runtime.train", "kubeforge_runtime.quantize", "kubeforge_runtime.serve"]
    for mod in modules:
        assert (REPO / "trainer_image" / Path(*mod.split(".")) / "__main__.py").exists(), f"python -m {mod}: no __main__"
    text = RUNTIME.read_text()
    assert re.search(r'ARG EXTRAS=\S*\bruntime\b', text), "the runtime extra must be installed"
    assert 'pip install --no-cache-dir ".[${EXTRAS}]"' in text
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+", text, re.M), "CUDA base image"
    user = [i for i in stages(instrs)[-1] if i.cmd == "USER"][-1].args
    assert user == f"{common.RUN_AS_USER}:{common.RUN_AS_USER}", "the image user is the workload pods' runAsUser"
    env = " ".join(i.args for i in stages(instrs)[-1] if i.cmd == "ENV")
    assert f"HOME={contract.WORKSPACE_DIR}" in env
    exposed = {int(p) for i in stages(instrs)[-1] if i.cmd == "EXPOSE" for p in i.args.split()}
    assert exposed == {contract.SERVE_HTTP_PORT, contract.SERVE_GRPC_PORT, contract.DEFAULT_METRICS_PORT}


def test_operator_image_command_line_parses():
    instrs = parse(OPERATOR)
    final = stages(instrs)[-1]
    entrypoint = json.loads(next(i.args for i in final if i.cmd == "ENTRYPOINT"))
    assert entrypoint == ["kubeforge"]
    assert '".[operator]"' in OPERATOR.read_text()
    (dep,) = [d for d in render() if d["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = build_parser().parse_args(args)  # the chart's args, as the image's ENTRYPOINT gets them
    assert parsed.command == "operator" and parsed.peering == "kubeforge" and parsed.webhook_port == 9443


def test_lint_catches_violations(tmp_path):
    """The checks above are not vacuous: a bad Dockerfile fails them."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nADD https://example.invalid/x.tgz /x\nRUN pip install foo\n")
    with pytest.raises(AssertionError):
        test_base_images_come_from_pinned_args_without_registry_host(bad)
    with pytest.raises(AssertionError):
        test_final_stage_runs_as_numeric_non_root_user(bad)
    with pytest.raises(AssertionError):
        test_no_add_no_remote_fetches_no_caches(bad)
    host = tmp_path / "Dockerfile.host"
    host.write_text("ARG B=registry.example.com/python:3.11\nFROM ${B}\nUSER 0\n")
    with pytest.raises(AssertionError):
        test_base_images_come_from_pinned_args_without_registry_host(host)
    with pytest.raises(AssertionError):
        test_final_stage_runs_as_numeric_non_root_user(host)
