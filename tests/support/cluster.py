"""A real, local Kubernetes control plane for the cluster tests.

Starts etcd, kube-apiserver (TLS, an admin client certificate, service-account keys, RBAC),
kube-controller-manager (Jobs, Deployments, garbage collection, namespace deletion,
service-account tokens), kube-scheduler and kwok (fake GPU nodes, playing the kubelet), all
built from their Go modules by ``hack/build-control-plane.sh`` and cached by version.

Every process gets free loopback ports, its own log file and is stopped by its own PID.

Pod IPs are addresses a real cluster could hand out: kwok takes them from 198.18.0.0/15
(RFC 2544, reserved for benchmarking, never routed), not from loopback, which the API server
refuses in Endpoints (its endpoint controllers then retry every write). Nothing the operator
does can send traffic off this machine all the same: before kwok starts, the range is routed
to the loopback device as a *local* route (``ip route replace local 198.18.0.0/15 dev lo``,
the way 127.0.0.0/8 is), so every packet to a pod IP is delivered on this machine and a test
can serve on a pod's IP (playing rank 0). Where that route cannot be made (no CAP_NET_ADMIN),
the pods fall back to the loopback range 127.16.0.0/16 and the cluster says so
(:attr:`LocalCluster.pod_cidr`); either way no pod IP leads off the machine.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "build-control-plane.sh"
KWOK_STAGES = Path(__file__).with_name("kwok-stages.yaml")
GPU_NODES = ("gpu-node-1", "gpu-node-2", "gpu-node-3")
GPUS_PER_NODE = 8
POD_RANGE = "198.18.0.0/15"
"""Where pod IPs come from (RFC 2544's benchmarking range), routed locally (:func:`route_pod_range_locally`)."""
LOOPBACK_POD_RANGE = "127.16.0.0/16"
"""The fallback where that route cannot be made (the API server refuses these in Endpoints)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_range_is_local(cidr: str = POD_RANGE) -> bool:
    """True if the kernel delivers every address of ``cidr`` on this machine (a ``local`` route)."""
    if shutil.which("ip") is None:
        return False
    out = subprocess.run(["ip", "route", "show", "table", "local", cidr], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.split()[:2] == ["local", cidr]


def route_pod_range_locally(cidr: str = POD_RANGE) -> bool:
    """Route ``cidr`` to the loopback device as local addresses; False where that is not allowed.

    ``replace`` makes it idempotent, so clusters started at once (or by other engineers) agree.
    The route is left in place on stop: another cluster on this machine may be using it, and it
    only keeps a reserved, never-routed range on this machine.
    """
    if pod_range_is_local(cidr):
        return True
    if shutil.which("ip") is None:
        return False
    out = subprocess.run(["ip", "route", "replace", "local", cidr, "dev", "lo"], capture_output=True, text=True)
    if out.returncode != 0:
        log.warning("cannot route %s locally (%s); pods get loopback IPs from %s",
                    cidr, out.stderr.strip(), LOOPBACK_POD_RANGE)
        return False
    return pod_range_is_local(cidr)


def build_binaries() -> Path:
    """Build (or find cached) binaries; returns the directory holding them."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """A CA, the API server's serving cert, an admin client cert and service-account keys."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=kubeforge-test-ca", cwd=d)
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n"
    )
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subj, ext in (("server", "/CN=kube-apiserver", "server.ext"),
                            ("admin", "/O=system:masters/CN=kubeforge-admin", "client.ext")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subj, cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", ext, cwd=d)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def kubeconfig(server: str, ca: Path, cert: Path | None = None, key: Path | None = None,
               token: str | None = None, user: str = "admin") -> dict[str, Any]:
    creds: dict[str, Any] = {}
    if cert and key:
        creds = {"client-certificate": str(cert), "client-key": str(key)}
    if token:
        creds = {"token": token}
    return {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "kubeforge-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "kubeforge-test", "context": {"cluster": "kubeforge-test", "user": user}}],
        "current-context": "kubeforge-test",
    }


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class LocalCluster:
    """The control plane; ``start()`` then use ``kubeconfig``/``kubectl()``; ``stop()`` at the end."""

    workdir: Path
    bin_dir: Path
    procs: list[Proc] = field(default_factory=list)
    server: str = ""
    startup_seconds: float = 0.0
    pod_cidr: str = ""  # POD_RANGE, or LOOPBACK_POD_RANGE where it could not be routed locally

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    def binary(self, name: str) -> str:
        return str(self.bin_dir / name)

    # --- processes ---------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> Proc:
        logf = self.workdir / "logs" / f"{name}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        with open(logf, "wb") as fh:
            popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        proc = Proc(name, popen, logf)
        self.procs.append(proc)
        return proc

    def _wait(self, what: str, check, timeout: float = 60.0, proc: Proc | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{self.tail(proc)}")
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}\n" + (self.tail(proc) if proc else ""))

    @staticmethod
    def tail(proc: Proc, lines: int = 40) -> str:
        try:
            return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def logs(self, lines: int = 60) -> str:
        return "\n".join(f"===== {p.name} ({p.log}) =====\n{self.tail(p, lines)}" for p in self.procs)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> "LocalCluster":
        t0 = time.monotonic()
        make_pki(self.pki)
        pki = self.pki
        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
        etcd = self._spawn("etcd", [
            self.binary("etcd"), "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}", f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}", "--unsafe-no-fsync=true",
            "--listen-metrics-urls=", "--log-level=warn",
        ])
        self._wait("etcd", lambda: socket.create_connection(("127.0.0.1", etcd_port), 1).close() or True, proc=etcd)
        self.server = f"https://127.0.0.1:{api_port}"
        api = self._spawn("kube-apiserver", [
            self.binary("kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}", f"--secure-port={api_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--tls-cert-file={pki / 'server.crt'}", f"--tls-private-key-file={pki / 'server.key'}",
            f"--client-ca-file={pki / 'ca.crt'}", "--service-cluster-ip-range=10.96.0.0/16",
            "--authorization-mode=RBAC", "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            # The front-proxy CA (unused here) keeps the API server from logging a missing
            # requestheader bundle several times a second.
            f"--requestheader-client-ca-file={pki / 'ca.crt'}", "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            "--allow-privileged=true", "--enable-priority-and-fairness=false", "--v=1",
            # TaintNodesByCondition puts node.kubernetes.io/not-ready:NoSchedule on every new
            # Node, and only the node-lifecycle controller (disabled below: kwok plays the
            # kubelet, there are no real heartbeats to judge) would take it off again; with
            # it, no pod would ever be scheduled onto the kwok nodes.
            "--disable-admission-plugins=TaintNodesByCondition",
        ])
        admin = kubeconfig(self.server, pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        self.kubeconfig.write_text(yaml.safe_dump(admin))
        self._wait("kube-apiserver /readyz", lambda: self.kubectl("get", "--raw=/readyz").returncode == 0,
                   timeout=90, proc=api)
        self._spawn("kube-controller-manager", [
            self.binary("kube-controller-manager"), f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service-lb-controller",
            "--concurrent-job-syncs=10", "--v=1",
        ])
        self._spawn("kube-scheduler", [
            self.binary("kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--v=1",
        ])
        self.pod_cidr = POD_RANGE if route_pod_range_locally() else LOOPBACK_POD_RANGE
        pods = ipaddress.ip_network(self.pod_cidr)  # kwok takes the range from its first host
        self._spawn("kwok", [
            self.binary("kwok"), f"--kubeconfig={self.kubeconfig}", f"--config={KWOK_STAGES}",
            "--manage-all-nodes=false", "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--cidr={pods[1]}/{pods.prefixlen}", "--node-ip=127.0.0.1", "--server-address=127.0.0.1:0",
            f"--node-port={free_port()}",
        ])
        self.apply_objects([self._node(n) for n in GPU_NODES])
        self._wait("GPU nodes Ready", self._nodes_ready, timeout=60)
        self._wait("default ServiceAccount", lambda: self.kubectl("get", "serviceaccount", "default").returncode == 0)
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=5)

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def _node(name: str) -> dict[str, Any]:
        capacity = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": str(GPUS_PER_NODE)}
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                         "labels": {"type": "kwok", "kubernetes.io/hostname": name,
                                    "nvidia.com/gpu.present": "true"}},
            "spec": {},
            "status": {"capacity": capacity, "allocatable": capacity},
        }

    def _nodes_ready(self) -> bool:
        out = self.kubectl("get", "nodes", "-o",
                           "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')].status}{' '}{end}")
        return out.returncode == 0 and out.stdout.split() == ["True"] * len(GPU_NODES)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}:{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, input: str | None = None, check: bool = False,
                kubeconfig_path: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [self.binary("kubectl"), f"--kubeconfig={kubeconfig_path or self.kubeconfig}", *args]
        out = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def apply_objects(self, objs: list[dict[str, Any]]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs), check=True)


def start_cluster(workdir: Path) -> LocalCluster:
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is needed to make the test cluster's certificates")
    bin_dir = build_binaries()
    cluster = LocalCluster(workdir=workdir, bin_dir=bin_dir)
    try:
        cluster.start()
    except BaseException:
        log.error("control plane failed to start:\n%s", cluster.logs())
        cluster.stop()
        raise
    return cluster
