"""The admission webhook's pure checks (the cluster test drives them through the API server)."""

from __future__ import annotations

from kubeforge.api.inference import repeated
from kubeforge.controllers.webhooks import (
    output_conflicts, output_uris, reference_problem, secret_literals, spec_unchanged, uris_overlap,
)


def job(kind, name, output, phase=None, checkpoint=None):
    spec = {"output": {"uri": output}}
    if checkpoint:
        spec["checkpoint"] = {"uri": checkpoint}
    return {"kind": kind, "metadata": {"name": name}, "spec": spec, "status": {"phase": phase} if phase else {}}


def test_uris_overlap_by_path_segment():
    assert uris_overlap("pvc://m/out", "pvc://m/out/")
    assert uris_overlap("pvc://m/out", "pvc://m/out/ckpt")
    assert uris_overlap("s3://b/x/y", "s3://b/x")
    assert not uris_overlap("pvc://m/out", "pvc://m/out2")
    assert not uris_overlap("pvc://m/out", "s3://m/out")


def test_output_uris_include_checkpoints_of_training_only():
    assert output_uris("FineTuneJob", {"output": {"uri": "pvc://a/o"}, "checkpoint": {"uri": "pvc://a/c"}}) == \
        ["pvc://a/o", "pvc://a/c"]
    assert output_uris("QuantizeJob", {"output": {"uri": "pvc://a/q"}}) == ["pvc://a/q"]


def test_output_conflicts_skip_self_and_failed_jobs():
    others = [job("FineTuneJob", "me", "pvc://m/o"), job("QuantizeJob", "dead", "pvc://m/o", phase="Failed"),
              job("FineTuneJob", "live", "pvc://m/other", checkpoint="pvc://m/o/ckpt")]
    problems = output_conflicts("FineTuneJob", "me", {"output": {"uri": "pvc://m/o"}}, others)
    assert len(problems) == 1 and "pvc://m/o/ckpt, written by FineTuneJob live" in problems[0]
    assert problems[0].startswith("spec.output.uri: ")  # the refusal names the field
    ckpt = output_conflicts("FineTuneJob", "new", {"output": {"uri": "pvc://x/y"}, "checkpoint": {"uri": "pvc://m/o"}},
                            others[:1])
    assert ckpt and ckpt[0].startswith("spec.checkpoint.uri: pvc://m/o overlaps pvc://m/o")
    assert output_conflicts("QuantizeJob", "me", {"output": {"uri": "pvc://m/o"}}, others[:2]) == [
        "spec.output.uri: pvc://m/o overlaps pvc://m/o, written by FineTuneJob me: choose another output location, "
        "or delete FineTuneJob me first"]  # same name, other kind: a different object


def test_duplicate_adapters():
    # The rule moved from the webhook to the API model (and the CRD's CEL); its helper:
    assert repeated([a["name"] for a in [{"name": "a"}, {"name": "b"}, {"name": "a"}, {"name": "a"}]]) == ["a"]
    assert repeated([]) == []


def test_reference_problem():
    assert reference_problem("FineTuneJob", "x", None)[0] is None
    assert "does not exist (yet)" in reference_problem("FineTuneJob", "x", None)[1]
    assert "has Failed" in reference_problem("FineTuneJob", "x", {"status": {"phase": "Failed"}})[0]
    assert reference_problem("QuantizeJob", "x", {"status": {"phase": "Running"}}) == (None, None)


def test_spec_unchanged_only_for_updates():
    a = {"spec": {"x": 1}, "metadata": {"labels": {"a": "1"}}}
    b = {"spec": {"x": 1}, "metadata": {"labels": {"a": "2"}}}
    assert spec_unchanged("UPDATE", a, b)
    assert not spec_unchanged("UPDATE", a, {"spec": {"x": 2}})
    assert not spec_unchanged("CREATE", None, b)


def test_secret_literals_in_env():
    env = [{"name": "HF_TOKEN", "value": "hf_abc"}, {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"},
           {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}},
           {"name": "TOKENIZERS_PARALLELISM", "value": "false"}, {"name": "MAX_TOKENS", "value": "5"},
           {"name": "OPENAI_API_KEY", "value": "sk"}]
    assert secret_literals({"template": {"env": env}}) == ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY"]
    assert secret_literals({}) == []


def test_uris_overlap_sees_through_spellings_of_one_path():
    # Compared as strings these all differed, so a second job could write into a live job's
    # output (or a QuantizeJob into its own input) by spelling the path differently.
    assert uris_overlap("pvc://m/out", "pvc://m/tmp/../out")
    assert uris_overlap("pvc://m/out", "pvc://m//out/./ckpt")
    assert uris_overlap("file:///data/out", "file:////data/./out/")
    assert uris_overlap("file:///data/out", "file://data/out")  # the runtime reads file://x as /x
    assert uris_overlap("s3://b/x/y/..", "s3://b/x")
    assert not uris_overlap("pvc://m/out/../out2", "pvc://m/out")
    problems = output_conflicts("QuantizeJob", "q", {"output": {"uri": "pvc://m/a/../o/"}},
                                [job("FineTuneJob", "ft", "pvc://m/o")])
    assert len(problems) == 1 and "written by FineTuneJob ft" in problems[0]


def test_credential_refusal_names_the_full_field():
    from kubeforge.controllers.webhooks import secret_problem

    msg = secret_problem({"template": {"env": [{"name": "HF_TOKEN", "value": "hf_x"}]}})
    assert msg.startswith("spec.template.env: HF_TOKEN look like credentials"), msg
    assert "valueFrom.secretKeyRef" in msg
    assert secret_problem({"template": {"env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {}}}]}}) is None


def test_the_checks_use_the_objects_own_namespace():
    import kopf
    import pytest

    from kubeforge.controllers.webhooks import object_namespace

    assert object_namespace({"metadata": {"namespace": "team-a"}}) == "team-a"
    assert object_namespace({"metadata": {"namespace": "team-a"}}, {"metadata": {"namespace": "team-a"}}) == "team-a"
    with pytest.raises(kopf.AdmissionError, match="metadata.namespace: the object names no namespace"):
        object_namespace({"metadata": {"name": "x"}})
    with pytest.raises(kopf.AdmissionError, match="metadata.namespace: team-b differs from the stored object's team-a"):
        object_namespace({"metadata": {"namespace": "team-b"}}, {"metadata": {"namespace": "team-a"}})


def test_a_spec_over_the_annotation_budget_is_refused_naming_spec():
    from kubeforge.api.size import SPEC_BUDGET_BYTES, size_problem, spec_size

    small = {"metadata": {"annotations": {"a": "b"}}, "spec": {"model": {"uri": "pvc://m/x"}}}
    assert size_problem(small) is None and spec_size(small) == len('{"model":{"uri":"pvc://m/x"}}') + 2
    # Many values each under the per-field bound add up past the budget: only the total catches it.
    env = [{"name": f"V{i}", "value": "x" * 3000} for i in range(80)]
    big = {"metadata": {}, "spec": {"template": {"env": env}}}
    msg = size_problem(big)
    assert msg and msg.startswith("spec: ") and f"over the {SPEC_BUDGET_BYTES // 1024} KiB" in msg
    # The object's own annotations count too: kopf's copy of the spec joins them.
    near = {"metadata": {"annotations": {"blob": "y" * (SPEC_BUDGET_BYTES - 100)}}, "spec": {"x": "z" * 200}}
    assert size_problem(near) is not None
