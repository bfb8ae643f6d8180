"""Killing the operator in the middle of reconciling 20 FineTuneJobs, then restarting it,
leaves exactly one set of children per job and every job running; re-applying changes nothing."""

from __future__ import annotations

import json

from collections import Counter
from collections.abc import Iterator

import pytest
import yaml

from support.finetune import Env, ftj, make_env
from support.waiting import get_json, wait_for

pytestmark = pytest.mark.cluster

JOBS = 20


@pytest.fixture
def env(cluster, tmp_path, request) -> Iterator[Env]:
    for e in make_env(cluster, tmp_path):
        request.node._kubeforge_logs = [str(e.operator.log_path)]
        yield e


def children(env: Env, kind: str) -> Counter:
    items = get_json(env.cluster, "-n", env.namespace, kind, "-l", "app.kubernetes.io/managed-by=kubeforge")["items"]
    return Counter(o["metadata"]["labels"]["kubeforge.io/finetunejob"] for o in items)


def phases(env: Env) -> Counter:
    items = get_json(env.cluster, "-n", env.namespace, "finetunejobs")["items"]
    return Counter((o.get("status") or {}).get("phase") for o in items)


def test_operator_killed_mid_reconcile_leaves_one_set_of_children_per_job(env: Env):
    names = [f"job-{i:02d}" for i in range(JOBS)]
    # 20 jobs x 2 workers x 0 GPUs: all fit on the three nodes at once.
    docs = [ftj(n, gpus=0) for n in names]
    env.cluster.kubectl("apply", "-n", env.namespace, "-f", "-", input=yaml.safe_dump_all(docs), check=True)

    # Kill it while it is busy: some jobs have children, others not yet.
    wait_for(lambda: sum(children(env, "jobs").values()) >= 3, 60, interval=0.1, what="first Jobs created")
    env.operator.kill()
    created_before = sum(children(env, "jobs").values())
    assert created_before < JOBS, "the operator finished before it was killed: nothing was interrupted"

    env.operator.start()
    wait_for(lambda: phases(env).get("Running") == JOBS, 180, interval=1, what=f"all {JOBS} jobs Running")

    for kind in ("jobs", "services", "configmaps"):
        counts = children(env, kind)
        assert counts == Counter({n: 1 for n in names}), (kind, counts)
    pods = children(env, "pods")
    assert pods == Counter({n: 2 for n in names}), pods

    # Another restart re-applies every child (resume handlers): nothing the operator owns
    # changes on the server. (Not resourceVersion: the Job controller's own status writes,
    # e.g. a late `ready` count, bump that without any write by the operator.)
    def versions() -> dict[str, tuple]:
        out = {}
        for kind in ("jobs", "services", "configmaps"):
            for o in get_json(env.cluster, "-n", env.namespace, kind, "-l", "app.kubernetes.io/managed-by=kubeforge",
                              "--show-managed-fields")["items"]:
                meta = o["metadata"]
                ours = [(m.get("operation"), m.get("time"), json.dumps(m.get("fieldsV1"), sort_keys=True))
                        for m in meta.get("managedFields", []) if m.get("manager") == "kubeforge"]
                assert ours, f"{kind}/{meta['name']} has no fields applied by the kubeforge field manager"
                out[f"{kind}/{meta['name']}"] = (meta.get("generation"), ours, json.dumps(o.get("spec", o.get("data")), sort_keys=True))
        return out

    before = versions()
    env.operator.stop()
    log_size = env.operator.log_path.stat().st_size
    env.operator.start()
    wait_for(lambda: env.operator.log_path.read_text()[log_size:].count("Resuming is processed") >= JOBS, 120,
             interval=1, what="every job resumed")
    assert versions() == before
    assert phases(env).get("Running") == JOBS
