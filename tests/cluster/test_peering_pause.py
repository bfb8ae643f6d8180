"""A replica that kopf peering has paused does no background work either (issue 17).

kopf pauses its handlers while a peer of higher priority is alive in the peering object; the
operator's own threads (the FineTuneJob poller: progress and ``ttlSecondsAfterFinished``; the
debouncer's scheduled syncs) must pause with them. The test freezes the operator the way
``kopf freeze`` does, by writing a live peer of higher priority into the ClusterKopfPeering,
while a finished FineTuneJob's TTL runs out: the paused replica must leave it alone. Once
the peer is removed, the same replica resumes and deletes it.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from support.finetune import Env, ftj
from support.waiting import wait_for

pytestmark = pytest.mark.cluster

TTL = 15
FREEZER = "freezer@test"


def set_freezer(cluster, present: bool) -> None:
    value = ({"priority": 1000, "lifetime": 600,
              "lastseen": dt.datetime.now(dt.timezone.utc).isoformat()} if present else None)
    cluster.kubectl("patch", "clusterkopfpeering", "kubeforge", "--type=merge",
                    "-p", json.dumps({"status": {FREEZER: value}}), check=True)


def test_a_paused_replica_neither_expires_nor_syncs(cluster, namespace, chart_operator, monkeypatch):
    monkeypatch.setenv("KUBEFORGE_FINETUNE_POLL_SECONDS", "0.5")
    op = chart_operator("pausable")
    env = Env(cluster, namespace, op)  # type: ignore[arg-type]
    try:
        env.apply(ftj("expiring", ttlSecondsAfterFinished=TTL))
        env.wait_running("expiring", timeout=90)
        for pod in env.pods("expiring"):
            env.exit_pod(pod, 0)
        env.wait_phase("expiring", "Succeeded", 60)
        finished = time.monotonic()

        set_freezer(cluster, True)
        wait_for(lambda: "Pausing operations" in op.log(), 10, interval=0.2, what="kopf to pause the replica")
        # Past the TTL, with the poller's rounds every 0.5 s: the paused replica must not act.
        time.sleep(max(0.0, finished + TTL + 6 - time.monotonic()))
        assert env.get("finetunejob", "expiring") is not None, \
            "a replica paused by peering deleted a FineTuneJob (ttlSecondsAfterFinished)"
        assert "background work waits" in op.log()

        set_freezer(cluster, False)
        wait_for(lambda: env.get("finetunejob", "expiring") is None, 30, what="the resumed replica to expire the job")
        assert "background work resumes" in op.log()
    finally:
        set_freezer(cluster, False)
