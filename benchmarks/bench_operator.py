"""Benchmark: hundreds of FineTuneJobs at once through the operator, against the same bare Jobs.

Starts the same control plane as the cluster tests (``tests/support/cluster.py``: etcd,
kube-apiserver, controller-manager, scheduler, kwok) with enough extra kwok GPU nodes, then
times two cases on the same signal:

* **operator**: N FineTuneJobs (2 workers x 1 GPU each) created as fast as 16 client threads
  can, with the operator running as a real process (``python -m kubeforge operator``) that
  has already reconciled one warm-up FineTuneJob (so its watches are up, as a deployed
  operator's are; the seconds that took are reported, not counted);
* **baseline**: the very Indexed Jobs the operator renders for them (same pod template, from
  :mod:`kubeforge.builders.finetune`), created directly, without the operator.

The clock of each job starts just before its create request and stops when *every one of
its worker pods is Ready*, as seen by one pod watch per case (the same code for both cases,
keyed by the ``batch.kubernetes.io/job-name`` label every Job pod carries). Each case runs in
a fresh namespace, which is deleted (and waited for) before the next case starts, and the
cases alternate over ``--repeats`` rounds (operator first in odd rounds, baseline first in
even ones), so neither side inherits the other's leftovers or always runs on a warmer
cluster. The ratio is the operator's own cost on top of Kubernetes' Job controller,
scheduler and (fake) kubelet.

Reported per case: p50/p99/max create -> all workers Ready and total wall time, each as the
median over rounds with the spread (min-max) of the rounds; the p50 ratio per round and its
median; per round, the median job's stages (create -> its Job seen on a Job watch -> its first
pod seen -> every worker Ready), which split the operator's share from Kubernetes'; the
operator's peak memory (VmHWM of its process), idle memory and CPU seconds while timed (on a
machine of few cores, the operator's CPU is taken from the control plane it waits for); the
CPU seconds of every control-plane process, the operator (and its main thread, kopf's event
loop) and this client while timed, per case (``/proc/<pid>/stat`` before and after), so the
operator case's extra CPU can be placed; the operator's syncs done on fresh reads, by why its
watch cache did not decide (``kubeforge_fresh_syncs_total`` from its ``/metrics``); with
``--api-calls`` the API requests per job by verb and resource, all clients (the API server's
own counters), and the Events by poster.

Run::

    python benchmarks/bench_operator.py              # 200 jobs, 3 rounds
    python benchmarks/bench_operator.py --quick      # 20 jobs, 2 rounds (CI-sized)
    python benchmarks/bench_operator.py --jobs 100 --repeats 1 --api-calls   # + API requests per job
    python benchmarks/bench_operator.py --repeats 1 --only operator          # one case (to profile it)

The numbers depend on the machine (the whole control plane shares its cores with the
operator and the client).
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


class ReadyPods:
    """One pod watch on a namespace: the time each Job first had all its workers Ready.

    The same code times both cases, so they stop their clocks on the same event. On the way it
    notes when each Job was first seen (a Job watch beside the pod watch) and when its first pod
    was, for the stage breakdown (:func:`stages`).
    """

    def __init__(self, cluster: LocalCluster, namespace: str, expected: set[str]) -> None:
        from kubernetes import client, watch

        self._core = client.CoreV1Api(api(cluster))
        self._batch = client.BatchV1Api(api(cluster))
        self._new_watch = watch.Watch
        self._watch = watch.Watch()
        self._job_watch = watch.Watch()
        self._expected = expected
        self._ready_pods: dict[str, set[str]] = {}
        self.done: dict[str, float] = {}
        self.job_seen: dict[str, float] = {}
        self.first_pod: dict[str, float] = {}
        self._all = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, args=(namespace,), daemon=True)
        self._thread.start()
        threading.Thread(target=self._run_jobs, args=(namespace,), daemon=True).start()

    def _run_jobs(self, namespace: str) -> None:
        """Note when each expected Job first shows up (the operator's part ends there)."""
        while not self._all.is_set() and not self._stopped:
            try:
                for event in self._job_watch.stream(self._batch.list_namespaced_job, namespace, timeout_seconds=0):
                    self.job_seen.setdefault(event["object"].metadata.name, time.monotonic())
                    if len(self.job_seen) >= len(self._expected):
                        self._job_watch.stop()
                        return
            except Exception as exc:  # noqa: BLE001 - logged, watched again
                log.warning("job watch on %s failed (%s); watching again", namespace, exc)
            self._job_watch = self._new_watch()

    def _run(self, namespace: str) -> None:
        # A watch the API server ends (or that fails) under load is started again: its fresh
        # list replays every pod as it is now, so no job is missed (one that became Ready in
        # the gap is timed at the restart, later than it was: counted against its case).
        while not self._all.is_set():
            try:
                for event in self._watch.stream(self._core.list_namespaced_pod, namespace, timeout_seconds=0):
                    if self._on_pod(event["object"]):
                        return
            except Exception as exc:  # noqa: BLE001 - logged, watched again
                log.warning("pod watch on %s failed (%s); watching again", namespace, exc)
            else:
                log.warning("pod watch on %s ended; watching again", namespace)
            if self._stopped:
                return
            self._watch = self._new_watch()

    def _on_pod(self, pod: Any) -> bool:
        """Record one pod event; True once every expected job has all its workers Ready."""
        job = (pod.metadata.labels or {}).get("batch.kubernetes.io/job-name")
        if job not in self._expected or job in self.done:
            return False
        self.first_pod.setdefault(job, time.monotonic())
        ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
        pods = self._ready_pods.setdefault(job, set())
        (pods.add if ready else pods.discard)(pod.metadata.name)
        if len(pods) >= WORKERS:
            self.done[job] = time.monotonic()
            if len(self.done) == len(self._expected):
                self._all.set()
                self._watch.stop()
                return True
        return False

    def wait(self, timeout: float) -> dict[str, float]:
        if not self._all.wait(timeout):
            self._stopped = True
            self._watch.stop()
            missing = len(self._expected) - len(self.done)
            raise TimeoutError(f"{missing} of {len(self._expected)} jobs not ready after {timeout:.0f}s")
        return dict(self.done)


def stages(started: dict[str, float], watcher: ReadyPods) -> dict[str, float]:
    """Median seconds of each stage over the jobs: create -> the Job is seen (bare Jobs: the
    create's own round trip and watch delay), -> its first pod is seen, -> every worker Ready."""
    def med(a: dict[str, float], b: dict[str, float]) -> float:
        return statistics.median(b[n] - a[n] for n in started if n in a and n in b)
    return {"createToJob": med(started, watcher.job_seen), "jobToFirstPod": med(watcher.job_seen, watcher.first_pod),
            "firstPodToReady": med(watcher.first_pod, watcher.done)}


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


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds the process ``pid`` (or only its thread ``thread``) has used so
    far (``/proc/<pid>/stat``, ``/proc/<pid>/task/<thread>/stat``)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(cluster: LocalCluster, operator_pid: int | None = None) -> dict[str, float]:
    """CPU seconds used so far by each control-plane process, the operator (if given) and this
    benchmark's own client (its create threads and watches), by name."""
    out = {p.name: cpu_seconds(p.popen.pid) for p in cluster.procs if p.popen.poll() is None}
    if operator_pid is not None:
        out["operator"] = cpu_seconds(operator_pid)
        # Its main thread runs kopf's asyncio loop: the watches, kopf's processing of every event
        # and its own patches, and the coroutine handlers; the syncs run on other threads.
        out["operator: kopf's event loop"] = cpu_seconds(operator_pid, operator_pid)
    out["benchmark client"] = cpu_seconds(os.getpid())
    return out


def cpu_diff(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 2) for k in after if k in before}


def case_cpu(case: dict[str, Any], name: str) -> float:
    """One case's CPU seconds for process ``name``, or for all processes (``"total"``; the
    operator's event-loop thread, ``"operator: ..."``, is part of the operator's figure)."""
    if name == "total":
        return sum(v for k, v in case["cpuSeconds"].items() if ": " not in k)
    return case["cpuSeconds"].get(name, 0.0)


def fresh_namespace(cluster: LocalCluster, name: str) -> None:
    cluster.kubectl("create", "namespace", name, check=True)
    deadline = time.monotonic() + 60  # pods need the namespace's default ServiceAccount
    while cluster.kubectl("get", "-n", name, "serviceaccount", "default").returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no default ServiceAccount in {name}")
        time.sleep(0.2)


def delete_namespace(cluster: LocalCluster, name: str) -> None:
    """Delete the namespace and wait until it (and so every pod of the case) is gone.

    The pods are deleted at once (no grace period: kwok's fake kubelet has nothing to stop),
    which takes the namespace controller minutes fewer on a loaded machine; not timed.
    """
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=True)
    cluster.kubectl("delete", "pods", "--all", "-n", name, "--grace-period=0", "--force", "--wait=false", timeout=300)
    cluster.kubectl("wait", "--for=delete", f"namespace/{name}", "--timeout=600s", check=True, timeout=660)


def api_request_counts(cluster: LocalCluster) -> dict[str, float]:
    """The API server's own request counters (``apiserver_request_total``), summed by
    verb, resource, subresource and dry run: ``"POST jobs"``, ``"PATCH finetunejobs/status"``, ..."""
    out = cluster.kubectl("get", "--raw", "/metrics", check=True)
    counts: dict[str, float] = {}
    for line in out.stdout.splitlines():
        if line.startswith("apiserver_request_duration_seconds_sum{"):
            prefix = "seconds "  # the time the API server spent answering, by the same key
        elif line.startswith("apiserver_request_total{"):
            prefix = ""
        else:
            continue
        labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1:line.rindex("}")].split(",") if "=" in kv)
        label = {k: v.strip('"') for k, v in labels.items()}
        key = f"{label.get('verb')} {label.get('resource')}" + (f"/{label['subresource']}" if label.get("subresource") else "") \
            + (" (dry run)" if label.get("dry_run") else "")
        key = prefix + key
        counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def event_reasons(cluster: LocalCluster, namespace: str) -> dict[str, int]:
    """The namespace's Events by ``component reason`` (who posted what), most first; an Event
    counted again by its poster (``count`` > 1) counts once, as one request made it."""
    out = cluster.kubectl("get", "events", "-n", namespace, "-o", "json", check=True)
    counts: dict[str, int] = {}
    for ev in json.loads(out.stdout).get("items", []):
        who = ev.get("reportingComponent") or (ev.get("source") or {}).get("component") or "?"
        key = f"{who} {ev.get('reason')}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def count_diff(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Requests made between two :func:`api_request_counts`, most first (zero rows left out)."""
    diff = {k: int(after.get(k, 0) - before.get(k, 0)) for k in after if not k.startswith("seconds ")}
    return dict(sorted(((k, v) for k, v in diff.items() if v > 0), key=lambda kv: -kv[1]))


def server_seconds(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Seconds the API server spent answering, by request key, between two :func:`api_request_counts`
    (long-running WATCHes left out)."""
    out = {k[len("seconds "):]: after[k] - before.get(k, 0.0) for k in after
           if k.startswith("seconds ") and not k.startswith("seconds WATCH")}
    return {k: v for k, v in out.items() if v > 0}


def job_names(n: int) -> list[str]:
    return [f"ft-{i:04d}" for i in range(n)]


def warm_up(co: Any, ns: str, timeout: float = 180) -> float:
    """Wait until the started operator has reconciled one (suspended, so podless) FineTuneJob,
    then delete it; the seconds that took.

    kopf answers /healthz before its watches are up, and under load their first list can be
    refused for a while ("storage is (re)initializing", retried with back-off): without this,
    the first jobs' clocks would include the operator's start-up, which bare Jobs (watched by
    a controller-manager started long before) never pay.
    """
    t0 = time.monotonic()
    body = {**ftj("warm-up"), "metadata": {"name": "warm-up"}}
    body["spec"] = {**body["spec"], "suspend": True}
    co.create_namespaced_custom_object("kubeforge.io", "v1alpha1", ns, "finetunejobs", body)
    while not (co.get_namespaced_custom_object("kubeforge.io", "v1alpha1", ns, "finetunejobs", "warm-up")
               .get("status") or {}).get("phase"):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"the operator did not reconcile a FineTuneJob within {timeout:.0f}s")
        time.sleep(0.2)
    co.delete_namespaced_custom_object("kubeforge.io", "v1alpha1", ns, "finetunejobs", "warm-up")
    log.info("operator reconciled the warm-up FineTuneJob %.1fs after it answered /healthz", time.monotonic() - t0)
    return time.monotonic() - t0


def run_operator_case(cluster: LocalCluster, n: int, ns: str, workdir: Path) -> dict[str, Any]:
    from kubernetes import client

    env = cluster.env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image")])
    port, live = free_port(), free_port()
    logf = open(workdir / f"operator-{ns}.log", "wb")
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
                    raise RuntimeError(f"operator did not start; see {workdir / f'operator-{ns}.log'}")
                time.sleep(0.2)
        co = client.CustomObjectsApi(api(cluster))
        out_warm = warm_up(co, ns)
        rss_idle = peak_rss_mib(op.pid)
        cpu_all = process_cpu(cluster, op.pid)
        names = job_names(n)
        watcher = ReadyPods(cluster, ns, set(names))
        started = create_all([(nm, ftj(nm)) for nm in names],
                             lambda o: co.create_namespaced_custom_object("kubeforge.io", "v1alpha1", ns, "finetunejobs", o))
        out = summarize(started, watcher.wait(timeout=900))
        out["stages"] = stages(started, watcher)
        out["operatorWarmUpSeconds"] = out_warm
        out["cpuSeconds"] = cpu_diff(cpu_all, process_cpu(cluster, op.pid))
        out["operatorCpuSeconds"] = out["cpuSeconds"]["operator"]
        out["operatorPeakRssMiB"] = peak_rss_mib(op.pid)
        out["operatorIdleRssMiB"] = rss_idle
        out["freshSyncs"] = fresh_syncs(port)
        return out
    finally:
        op.terminate()
        try:
            op.wait(timeout=20)
        except subprocess.TimeoutExpired:
            op.kill()
        logf.close()


def fresh_syncs(metrics_port: int) -> dict[str, float]:
    """The operator's ``kubeforge_fresh_syncs_total`` by reason (syncs its watch cache did not
    decide, so that read the FineTuneJob, its Job and pods from the API server), since its start."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kubeforge_fresh_syncs_total":
                reason = sample.labels.get("reason", "?")
                out[reason] = out.get(reason, 0.0) + sample.value
    return out


def run_baseline_case(cluster: LocalCluster, n: int, ns: str) -> dict[str, Any]:
    """The same Indexed Jobs, created directly (no operator), timed on the same pod watch."""
    from kubernetes import client

    from kubeforge.api.finetune import FineTuneJobSpec
    from kubeforge.builders import finetune as fb

    batch = client.BatchV1Api(api(cluster))
    names = job_names(n)
    jobs = []
    for nm in names:
        job = fb.job(nm, ns, f"uid-{nm}", FineTuneJobSpec.model_validate(ftj(nm)["spec"]))
        del job["metadata"]["ownerReferences"]  # no owner here: the garbage collector would delete it
        jobs.append((nm, job))
    cpu_all = process_cpu(cluster)
    watcher = ReadyPods(cluster, ns, set(names))
    started = create_all(jobs, lambda j: batch.create_namespaced_job(ns, j))
    out = summarize(started, watcher.wait(timeout=900))
    out["cpuSeconds"] = cpu_diff(cpu_all, process_cpu(cluster))
    out["stages"] = stages(started, watcher)
    return out


def _spread(rounds: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [r[key] for r in rounds]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="FineTuneJobs created at once (default 200)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 3; quick 2)")
    parser.add_argument("--quick", action="store_true", help="20 jobs, 2 rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--workdir", default=None, help="keep the cluster's and the operator's logs here")
    parser.add_argument("--api-calls", action="store_true",
                        help="also print each case's API requests (the API server's apiserver_request_total, "
                             "all clients: the difference between the cases is the operator's share)")
    parser.add_argument("--only", choices=("operator", "baseline"), default=None,
                        help="run one case only (to profile it; no ratio is printed)")
    args = parser.parse_args(argv)
    n = 20 if args.quick else args.jobs
    repeats = args.repeats or (2 if args.quick else 3)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        cluster = start_cluster(workdir / "cluster")
        rounds: dict[str, list[dict[str, Any]]] = {"operator": [], "baseline": []}
        try:
            cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"), check=True)
            cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "-l",
                            "app.kubernetes.io/part-of=kubeforge", check=True)
            # Room for one case's workers (1 GPU each), plus the three default nodes; the
            # namespace of the previous case is gone before the next one starts.
            extra = math.ceil(n * WORKERS / GPUS_PER_NODE)
            add_nodes(cluster, extra)
            log.info("control plane with %d kwok GPU nodes up in %.1fs", extra + 3, time.monotonic() - t0)
            for r in range(repeats):
                order = ("operator", "baseline") if r % 2 == 0 else ("baseline", "operator")
                for case in order:
                    if args.only and case != args.only:
                        continue
                    ns = f"bench-{case}-{r}"
                    fresh_namespace(cluster, ns)
                    log.info("round %d/%d, %s case: %d jobs", r + 1, repeats, case, n)
                    before = api_request_counts(cluster) if args.api_calls else {}
                    if case == "operator":
                        rounds[case].append(run_operator_case(cluster, n, ns, workdir))
                    else:
                        rounds[case].append(run_baseline_case(cluster, n, ns))
                    if args.api_calls:
                        after = api_request_counts(cluster)
                        rounds[case][-1]["apiCalls"] = count_diff(before, after)
                        rounds[case][-1]["apiSeconds"] = server_seconds(before, after)
                        rounds[case][-1]["events"] = event_reasons(cluster, ns)
                    log.info("%s p50 %.2f s", case, rounds[case][-1]["p50"])
                    delete_namespace(cluster, ns)
        finally:
            cluster.stop()

    if args.only:
        print(json.dumps(rounds))
        return 0
    ratios = [o["p50"] / b["p50"] for o, b in zip(rounds["operator"], rounds["baseline"])]
    result: dict[str, Any] = {
        "jobs": n, "workersPerJob": WORKERS, "nodes": extra + 3, "repeats": repeats, "podCidr": cluster.pod_cidr,
        "rounds": rounds,
        "ratioP50": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios},
        "operatorPeakRssMiB": max(o["operatorPeakRssMiB"] for o in rounds["operator"]),
        "operatorIdleRssMiB": max(o["operatorIdleRssMiB"] for o in rounds["operator"]),
    }
    for case in rounds:
        result[case] = {k: _spread(rounds[case], k) for k in ("p50", "p99", "max", "total")}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"\n{n} FineTuneJobs x {WORKERS} workers, {result['nodes']} kwok GPU nodes, {repeats} alternating rounds; "
          f"pod IPs from {result['podCidr']}; create -> every worker pod Ready (one pod watch), "
          "median of rounds [min-max]")
    print(f"{'':24}{'p50':>20}{'p99':>20}{'total':>20}")
    for case, label in (("operator", "operator (FineTuneJob)"), ("baseline", "baseline (bare Job)")):
        row = result[case]
        cells = "".join(f"{row[k]['median']:>7.2f} [{row[k]['min']:.2f}-{row[k]['max']:.2f}]".rjust(20)
                        for k in ("p50", "p99", "total"))
        print(f"{label:24}{cells}  s")
    rt = result["ratioP50"]
    print(f"ratio operator/baseline p50: {rt['median']:.2f}x [{rt['min']:.2f}-{rt['max']:.2f}] "
          f"(rounds: {', '.join(f'{x:.2f}' for x in rt['rounds'])})")
    print("median stages per round, s (create -> Job seen / -> first pod seen / -> every worker Ready):")
    for case in rounds:
        print(f"  {case:10}" + "   ".join(f"{r['stages']['createToJob']:.2f} / {r['stages']['jobToFirstPod']:.2f} / "
                                          f"{r['stages']['firstPodToReady']:.2f}" for r in rounds[case]))
    print(f"operator peak memory: {result['operatorPeakRssMiB']:.0f} MiB (idle {result['operatorIdleRssMiB']:.0f} MiB)")
    print("operator CPU while timed (user + system): "
          + ", ".join(f"{o['operatorCpuSeconds']:.1f}" for o in rounds["operator"]) + " s")
    print("CPU seconds while timed (create -> every worker Ready), per process, round by round "
          "(operator / baseline):")
    procs = sorted({k for case in rounds.values() for r in case for k in r["cpuSeconds"]},
                   key=lambda k: -sum(r["cpuSeconds"].get(k, 0) for r in rounds["operator"]))
    for name in procs + ["total"]:
        cells = [f"{case_cpu(o, name):7.1f} / {case_cpu(b, name):6.1f}"
                 for o, b in zip(rounds["operator"], rounds["baseline"])]
        print(f"  {name:26}" + "   ".join(cells))
    print("operator syncs on fresh reads per job, by why its watch cache did not decide (round by round, "
          "since its start: the warm-up job's included): "
          + "; ".join(", ".join(f"{k} {v / n:.2f}" for k, v in sorted(o["freshSyncs"].items())) or "none"
                      for o in rounds["operator"]))
    print("operator start -> warm-up FineTuneJob reconciled (not timed): "
          + ", ".join(f"{o['operatorWarmUpSeconds']:.1f}" for o in rounds["operator"]) + " s")
    if args.api_calls:
        print(f"API requests per job, round 1, all clients (create -> every worker Ready; {n} jobs):")
        op, base = rounds["operator"][0]["apiCalls"], rounds["baseline"][0]["apiCalls"]
        secs = rounds["operator"][0]["apiSeconds"], rounds["baseline"][0]["apiSeconds"]
        print(f"{'':36}{'operator':>10}{'baseline':>10}   mean ms in the API server (operator, baseline)")
        for key in sorted(op.keys() | base.keys(), key=lambda k: -(op.get(k, 0) + base.get(k, 0))):
            mean = [f"{1000 * sec.get(key, 0) / c[key]:.0f}" if c.get(key) else "-" for sec, c in zip(secs, (op, base))]
            print(f"{key:36}{op.get(key, 0) / n:>10.2f}{base.get(key, 0) / n:>10.2f}   {mean[0]:>6} {mean[1]:>6}")
        print(f"{'total':36}{sum(op.values()) / n:>10.2f}{sum(base.values()) / n:>10.2f}")
        print("Events per job, round 1, by poster and reason (as listed at the end of the case):")
        op, base = rounds["operator"][0]["events"], rounds["baseline"][0]["events"]
        for key in sorted(op.keys() | base.keys(), key=lambda k: -(op.get(k, 0) + base.get(k, 0))):
            print(f"  {key:34}{op.get(key, 0) / n:>10.2f}{base.get(key, 0) / n:>10.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
