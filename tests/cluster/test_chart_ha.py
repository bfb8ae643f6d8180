"""High availability: two operator replicas with kopf peering, as the chart runs them.

Two processes with the chart's args (``--peering=kubeforge``) and the chart's ServiceAccount
credentials share the ClusterKopfPeering. The first one started is active; the second stands
by (paused). Killing the active one with SIGKILL (a crash: no goodbye in the peering object)
hands reconciliation to the standby within the peering lifetime, and the logs show that no
object was handled by both: every handler line of the standby comes after the kill.
"""

from __future__ import annotations

import datetime as dt
import re
import time

import pytest
import yaml

from support.chart import FINETUNE, PEERING_LIFETIME, accepted, resource
from support.waiting import wait_for

pytestmark = pytest.mark.cluster

HANDLED = re.compile(r"^(\S+ \S+) INFO kopf\.objects: \[(\w+) ([^\]]+)\] Handler '([^']+)' succeeded", re.M)


def handled(log: str, namespace: str) -> list[tuple[float, str]]:
    """(time, "Kind name") of every successful handler run on an object of ``namespace``."""
    out = []
    for stamp, kind, where, _handler in HANDLED.findall(log):
        ns, _, name = where.partition("/")
        if ns == namespace:
            t = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((t, f"{kind} {name}"))
    return out


def peers(cluster) -> dict:
    obj = yaml.safe_load(cluster.kubectl("get", "clusterkopfpeering", "kubeforge", "-o", "yaml", check=True).stdout)
    return obj.get("status") or {}


def ftj(name: str) -> str:
    return yaml.safe_dump(resource("FineTuneJob", name, {**FINETUNE, "output": {"uri": f"pvc://models/{name}"}}))


def test_killing_the_active_replica_hands_over_within_the_peering_lifetime(cluster, namespace, chart_operator):
    assert f"--peering-lifetime={PEERING_LIFETIME}" in chart_operator.args
    a = chart_operator("replica-a")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=ftj("before-b"), check=True)
    wait_for(lambda: accepted(cluster, namespace, "FineTuneJob", "before-b"), 60, what="A is active")

    b = chart_operator("replica-b")
    # B starts paused (peering is mandatory) and stays so once it sees A, the older replica,
    # alive above it in the peering object.
    wait_for(lambda: {"replica-a", "replica-b"} <= set(peers(cluster)), 60, what="both replicas in the peering")
    assert peers(cluster)["replica-a"]["priority"] > peers(cluster)["replica-b"]["priority"]
    assert "Resuming operations" not in b.log()
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=ftj("while-both"), check=True)
    wait_for(lambda: accepted(cluster, namespace, "FineTuneJob", "while-both"), 60, what="while-both accepted")
    time.sleep(2)  # give a wrongly active B the chance to show itself in its log
    assert handled(b.log(), namespace) == [], "the standby reconciled while the active replica was alive"
    assert {obj for _, obj in handled(a.log(), namespace)} >= {"FineTuneJob before-b", "FineTuneJob while-both"}

    killed_at = time.time()
    a.kill()
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=ftj("after-kill"), check=True)
    wait_for(lambda: accepted(cluster, namespace, "FineTuneJob", "after-kill"), PEERING_LIFETIME + 20,
             interval=0.2, what="B takes over")
    took = time.time() - killed_at
    print(f"\n[ha] standby took over {took:.1f} s after SIGKILL of the active replica "
          f"(peering lifetime {PEERING_LIFETIME} s)")
    # A's last keep-alive may be up to the lifetime old minus 5-10 s of jitter when it dies,
    # so the handover comes at most one lifetime after the kill (plus the time to reconcile).
    assert took <= PEERING_LIFETIME + 8  # + reconcile and scheduling slack on a loaded 2-core machine
    assert "Resuming operations after the pause" in b.log()

    # kopf logs "Handler ... succeeded" once the handler returns, a moment after the status
    # write the wait above saw (under load, after this line ran once).
    wait_for(lambda: "FineTuneJob after-kill" in {obj for _, obj in handled(b.log(), namespace)}, 15,
             interval=0.2, what="B's handler line for after-kill")
    a_handled, b_handled = handled(a.log(), namespace), handled(b.log(), namespace)
    assert all(t >= killed_at for t, _ in b_handled), "B handled an object before A was dead"
    assert all(t <= killed_at for t, _ in a_handled)
    assert "FineTuneJob after-kill" not in {obj for _, obj in a_handled}
