"""Benchmark: hundreds of FineTuneJobs at once through the operator, on the local control plane.

Starts the same control plane as the cluster tests (``tests/support/cluster.py``: etcd,
kube-apiserver, controller-manager, scheduler, kwok) with enough extra kwok GPU nodes, runs
the operator as a real process (``python -m kubeforge operator``), creates N FineTuneJobs
(2 workers x 1 GPU each) as fast as 16 client threads can, and measures for each job the
time from its create request to status ``Running`` with both workers ready.

Baseline, in the same run: the very Indexed Jobs the operator would render (same pod
template, from :mod:`kubeforge.builders.finetune`), created directly, without the operator,
timed to both pods ready. The ratio is the operator's own cost on top of Kubernetes'
Job controller, scheduler and (fake) kubelet.

Reported: p50/p99/max create -> Running, total wall time (first create to last Running),
operator peak memory (VmHWM of its process), and the baseline with the ratio.

Run::

    python benchmarks/bench_operator.py            # 200 jobs
    python benchmarks/bench_operator.py --quick    # 20 jobs (CI)

The numbers depend on the machine (the whole control plane shares its cores with the
operator) and on the polling interval (0.25 s, which bounds the resolution).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for p in ("operator", "trainer_image", "tests"):
    sys.path.insert(0, str(REPO / p))

from support.cluster import GPUS_PER_NODE, LocalCluster, free_port, start_cluster  # noqa: E402

log = logging.getLogger("bench_operator")
POLL = 0.25
WORKERS = 2


def ftj(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {"model": {"uri": "hf://acme/tiny-llama@main"}, "dataset": {"uri": "s3://data/train.jsonl"},
                 "output": {"uri": f"s3://models/{name}"}, "nodes": {"min": WORKERS, "max": WORKERS},
                 "resources": {"gpus": 1}},
    }


def add_nodes(cluster: LocalCluster, count: int) -> None:
    nodes = []
    for i in range(count):
        node = cluster._node(f"bench-node-{i:03d}")
        nodes.append(node)
    cluster.apply_objects(nodes)

    def ready() -> bool:
        out = cluster.kubectl("get", "nodes", "-o", "jsonpath={.items[*].status.conditions[?(@.type=='Ready')].status}")
        return out.stdout.split().count("True") >= count + 3

    deadline = time.monotonic() + 120
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError("kwok nodes not Ready")
        time.sleep(0.5)


def api(cluster: LocalCluster):
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
    cfg.connection_pool_maxsize = 32
    return client.ApiClient(cfg)


def create_all(objs: list[tuple[str, dict[str, Any]]], post) -> dict[str, float]:
    """POST every object from 16 threads; returns name -> monotonic time just before its request."""
    started: dict[str, float] = {}

    def one(item: tuple[str, dict[str, Any]]) -> None:
        name, obj = item
        started[name] = time.monotonic()
        post(obj)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, objs))
    return started


def watch_until(names: list[str], list_ready, timeout: float) -> dict[str, float]:
    """Poll ``list_ready()`` (names that are ready now) until all are; name -> first seen ready."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(names):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(names) - len(seen)} of {len(names)} not ready after {timeout:.0f}s")
        t = time.monotonic()
        for n in list_ready():
            seen.setdefault(n, t)
        time.sleep(POLL)
    return seen


def summarize(started: dict[str, float], ready: dict[str, float]) -> dict[str, float]:
    lat = sorted(ready[n] - started[n] for n in started)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    return {"p50": statistics.median(lat), "p99": q[98], "max": lat[-1],
            "total": max(ready.values()) - min(started.values())}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_operator_case(cluster: LocalCluster, n: int, workdir: Path) -> dict[str, Any]:
    from kubernetes import client

    ns = "bench-operator"
    cluster.kubectl("create", "namespace", ns, check=True)
    env = cluster.env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image")])
    port, live = free_port(), free_port()
    logf = open(workdir / "operator.log", "wb")
    op = subprocess.Popen([sys.executable, "-m", "kubeforge", "operator", "--standalone", "-n", ns,
                           "--metrics-port", str(port), "--liveness-port", str(live)],
                          stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        import urllib.request

        deadline = time.monotonic() + 60
        while True:  # kopf answers /healthz once its startup is done and it is watching
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{live}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or op.poll() is not None:
                    raise RuntimeError(f"operator did not start; see {workdir / 'operator.log'}")
                time.sleep(0.2)
        time.sleep(1)
        rss_idle = peak_rss_mib(op.pid)
        co = client.CustomObjectsApi(api(cluster))
        names = [f"ft-{i:04d}" for i in range(n)]
        started = create_all([(nm, ftj(nm)) for nm in names],
                             lambda o: co.create_namespaced_custom_object("kubeforge.io", "v1alpha1", ns, "finetunejobs", o))

        def running() -> list[str]:
            items = co.list_namespaced_custom_object("kubeforge.io", "v1alpha1", ns, "finetunejobs")["items"]
            return [o["metadata"]["name"] for o in items
                    if (o.get("status") or {}).get("phase") == "Running"
                    and ((o.get("status") or {}).get("workers") or {}).get("ready") == WORKERS]

        ready = watch_until(names, running, timeout=600)
        out = summarize(started, ready)
        out["operatorPeakRssMiB"] = peak_rss_mib(op.pid)
        out["operatorIdleRssMiB"] = rss_idle
        return out
    finally:
        op.terminate()
        try:
            op.wait(timeout=20)
        except subprocess.TimeoutExpired:
            op.kill()
        logf.close()


def run_baseline_case(cluster: LocalCluster, n: int) -> dict[str, Any]:
    """The same Indexed Jobs, created directly (no operator), timed to both pods ready."""
    from kubernetes import client

    from kubeforge.api.finetune import FineTuneJobSpec
    from kubeforge.builders import finetune as fb

    ns = "bench-baseline"
    cluster.kubectl("create", "namespace", ns, check=True)
    batch = client.BatchV1Api(api(cluster))
    names = [f"ft-{i:04d}" for i in range(n)]
    jobs = []
    for nm in names:
        job = fb.job(nm, ns, f"uid-{nm}", FineTuneJobSpec.model_validate(ftj(nm)["spec"]))
        del job["metadata"]["ownerReferences"]  # no owner here: the garbage collector would delete it
        jobs.append((nm, job))
    started = create_all(jobs, lambda j: batch.create_namespaced_job(ns, j))

    def ready() -> list[str]:
        items = batch.list_namespaced_job(ns).items
        return [j.metadata.name for j in items if (j.status.ready or 0) == WORKERS]

    return summarize(started, watch_until(names, ready, timeout=600))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="FineTuneJobs created at once (default 200)")
    parser.add_argument("--quick", action="store_true", help="20 jobs")
    parser.add_argument("--no-baseline", action="store_true", help="skip the operator-less baseline")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--workdir", default=None, help="keep the cluster's and the operator's logs here")
    args = parser.parse_args(argv)
    n = 20 if args.quick else args.jobs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        cluster = start_cluster(workdir / "cluster")
        try:
            cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"), check=True)
            cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "-l",
                            "app.kubernetes.io/part-of=kubeforge", check=True)
            # Room for both cases' workers at once (1 GPU each), plus the three default nodes.
            extra = math.ceil(2 * n * WORKERS / GPUS_PER_NODE)
            add_nodes(cluster, extra)
            log.info("control plane with %d kwok GPU nodes up in %.1fs", extra + 3, time.monotonic() - t0)
            result: dict[str, Any] = {"jobs": n, "workersPerJob": WORKERS, "nodes": extra + 3}
            log.info("operator case: creating %d FineTuneJobs", n)
            result["operator"] = run_operator_case(cluster, n, workdir)
            if not args.no_baseline:
                log.info("baseline case: creating %d Indexed Jobs directly", n)
                result["baseline"] = run_baseline_case(cluster, n)
                result["ratioP50"] = result["operator"]["p50"] / result["baseline"]["p50"]
        finally:
            cluster.stop()

    if args.json:
        print(json.dumps(result))
        return 0
    o = result["operator"]
    print(f"\n{n} FineTuneJobs x {WORKERS} workers, {result['nodes']} kwok GPU nodes")
    print(f"{'':24}{'p50':>8}{'p99':>8}{'max':>8}{'total':>9}")
    print(f"{'operator (FineTuneJob)':24}{o['p50']:8.2f}{o['p99']:8.2f}{o['max']:8.2f}{o['total']:9.2f}  s")
    if "baseline" in result:
        b = result["baseline"]
        print(f"{'baseline (bare Job)':24}{b['p50']:8.2f}{b['p99']:8.2f}{b['max']:8.2f}{b['total']:9.2f}  s")
        print(f"ratio operator/baseline p50: {result['ratioP50']:.2f}x")
    print(f"operator peak memory: {o['operatorPeakRssMiB']:.0f} MiB (idle {o['operatorIdleRssMiB']:.0f} MiB)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
