"""ttlSecondsAfterFinished deletes only the object that finished (issue 17, TTL delete).

The FineTuneJob reconciler decides to delete from an object it read at the start of its sync.
Should that object be deleted and created again under the same name before the DELETE goes
out, a delete by name alone would remove the new, unrelated job. The reconciler's ``after``
step runs here in-process against the real API server with exactly that stale read: the
delete carries the old UID as a precondition, the API server refuses it, the new job stays.
"""

from __future__ import annotations

import json

import pytest
import yaml

from support.finetune import ftj

pytestmark = pytest.mark.cluster

FINISHED_LONG_AGO = {"phase": "Succeeded", "completionTime": "2026-01-01T00:00:00Z"}


def test_a_recreated_job_of_the_same_name_survives_the_old_ones_ttl(cluster, namespace, monkeypatch):
    from kubeforge import kube
    from kubeforge.controllers import finetune, finetune_status

    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setattr(kube, "_api", None)  # a fresh client for this cluster

    def create() -> dict:
        cluster.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(ftj("ttl", ttlSecondsAfterFinished=5)),
                        check=True)
        return json.loads(cluster.kubectl("get", "-n", namespace, "finetunejob", "ttl", "-o", "json", check=True).stdout)

    old = create()
    cluster.kubectl("delete", "-n", namespace, "finetunejob", "ttl", check=True)
    new = create()
    assert new["metadata"]["uid"] != old["metadata"]["uid"]

    spec = finetune_status.validate(old)
    finetune._after(old, spec, finetune_status.FineTuneOutcome(dict(FINISHED_LONG_AGO)), False)
    out = cluster.kubectl("get", "-n", namespace, "finetunejob", "ttl", "-o", "json")
    assert out.returncode == 0, "the re-created FineTuneJob was deleted by the old one's TTL"
    assert json.loads(out.stdout)["metadata"]["uid"] == new["metadata"]["uid"]

    # The very object whose TTL passed is still deleted.
    finetune._after(new, spec, finetune_status.FineTuneOutcome(dict(FINISHED_LONG_AGO)), False)
    assert cluster.kubectl("get", "-n", namespace, "finetunejob", "ttl").returncode != 0
