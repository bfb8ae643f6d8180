"""Every emptyDir a builder puts into a workload pod has a sizeLimit (issue 17).

/workspace (every kind) and the memory-backed /dev/shm (training) take the spec's
``resources.workspaceSize``/``resources.sharedMemorySize``, else the operator's defaults
(``KUBEFORGE_WORKSPACE_SIZE``/``KUBEFORGE_SHARED_MEMORY_SIZE``, the chart's workloadDefaults),
else the built-in ones. The golden FineTuneJob manifests show the defaults in place.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubeforge.api.finetune import FineTuneJobSpec
from kubeforge.api.inference import InferenceServiceSpec
from kubeforge.api.quantize import QuantizeJobSpec
from kubeforge.builders import common
from kubeforge.builders import finetune as fb
from kubeforge.builders import inference as ib
from kubeforge.builders import quantize as qb

UID = "5b1e0c9e-0000-4000-8000-000000000001"


def pods(resources: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The pod spec each kind builds, by kind."""
    res = {"resources": resources} if resources else {}
    ft = fb.build("ft", "ns", UID, FineTuneJobSpec.model_validate(
        {"model": {"uri": "pvc://m/base"}, "dataset": {"uri": "pvc://d/x.jsonl"}, "output": {"uri": "pvc://m/o"}, **res}))
    qj = qb.build_children("qj", "ns", UID, QuantizeJobSpec.model_validate(
        {"model": {"uri": "pvc://m/base"}, "output": {"uri": "pvc://m/q"}, **res}), "pvc://m/base")
    isvc = [ib.build_deployment("is", "ns", UID, InferenceServiceSpec.model_validate(
        {"model": {"uri": "pvc://m/base"}, **res}), ib.ModelRef("pvc://m/base", "r1"))]
    out = {}
    for kind, objs in (("FineTuneJob", ft), ("QuantizeJob", qj), ("InferenceService", isvc)):
        (workload,) = [o for o in objs if o["kind"] in ("Job", "Deployment")]
        out[kind] = workload["spec"]["template"]["spec"]
    return out


def empty_dirs(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v}


def test_every_emptydir_of_every_kind_has_a_size_limit(monkeypatch):
    monkeypatch.delenv(common.WORKSPACE_SIZE_ENV, raising=False)
    monkeypatch.delenv(common.SHM_SIZE_ENV, raising=False)
    for kind, pod in pods().items():
        dirs = empty_dirs(pod)
        assert dirs, kind
        for name, ed in dirs.items():
            assert ed.get("sizeLimit"), f"{kind}: emptyDir {name} has no sizeLimit"
        assert dirs[common.WORKSPACE_VOLUME]["sizeLimit"] == common.DEFAULT_WORKSPACE_SIZE
    assert empty_dirs(pods()["FineTuneJob"])[common.SHM_VOLUME] == {"medium": "Memory",
                                                                     "sizeLimit": common.DEFAULT_SHM_SIZE}


def test_the_operators_defaults_come_from_its_environment(monkeypatch):
    monkeypatch.setenv(common.WORKSPACE_SIZE_ENV, "20Gi")
    monkeypatch.setenv(common.SHM_SIZE_ENV, "2Gi")
    built = pods()
    for kind, pod in built.items():
        assert empty_dirs(pod)[common.WORKSPACE_VOLUME]["sizeLimit"] == "20Gi", kind
    assert empty_dirs(built["FineTuneJob"])[common.SHM_VOLUME]["sizeLimit"] == "2Gi"


def test_the_spec_overrides_the_defaults(monkeypatch):
    monkeypatch.setenv(common.WORKSPACE_SIZE_ENV, "20Gi")
    built = pods({"workspaceSize": "200Gi", "sharedMemorySize": "16Gi"})
    for kind, pod in built.items():
        assert empty_dirs(pod)[common.WORKSPACE_VOLUME]["sizeLimit"] == "200Gi", kind
    assert empty_dirs(built["FineTuneJob"])[common.SHM_VOLUME]["sizeLimit"] == "16Gi"


def test_a_size_that_is_no_quantity_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="workspaceSize"):
        QuantizeJobSpec.model_validate({"model": {"uri": "pvc://m/b"}, "output": {"uri": "pvc://m/q"},
                                        "resources": {"workspaceSize": "a lot"}})
