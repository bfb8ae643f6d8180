"""FineTuneJob builders (pure): golden manifests plus one test per spec branch.

The golden files under ``golden/`` were reviewed by hand (torchrun flags, PET_* variables,
failure policy, hardening, mounts). To change them on purpose:
``KUBEFORGE_UPDATE_GOLDEN=1 pytest tests/unit/operator/test_finetune_builder.py`` and review
the diff like any other code change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from kubeforge.api.finetune import FineTuneJobSpec
from kubeforge.builders import finetune as fb
from kubeforge_runtime import contract
from kubeforge_runtime.train.config import parse_config

GOLDEN = Path(__file__).with_name("golden")
UID = "5b1e0c9e-0000-4000-8000-000000000001"
NS = "team-a"


def spec(**over) -> FineTuneJobSpec:
    base = {"model": {"uri": "hf://acme/tiny-llama@main"}, "dataset": {"uri": "s3://data/train.jsonl"},
            "output": {"uri": "s3://models/out"}}
    base.update(over)
    return FineTuneJobSpec.model_validate(base)


def two_node() -> FineTuneJobSpec:
    return spec(
        model={"uri": "pvc://models/base/llama"},
        dataset={"uri": "pvc://data/train.jsonl", "validationUri": "pvc://data/val.jsonl", "format": "chat"},
        output={"uri": "pvc://models/out", "format": "adapter"},
        checkpoint={"intervalSteps": 50, "uri": "pvc://scratch/ckpt"},
        nodes={"min": 2, "max": 2}, resources={"gpus": 8, "cpu": 32, "memory": "256Gi"},
        parallelism={"tensor": 2, "pipeline": 1, "strategy": "fsdp"},
        training={"maxSteps": 1000, "globalBatchSize": 64, "microBatchSize": 2, "precision": "bf16"},
        maxRestarts=5, backoffLimit=4, activeDeadlineSeconds=86400,
    )


def _golden(name: str, objs: list[dict]) -> None:
    path = GOLDEN / name
    text = yaml.safe_dump_all(objs, sort_keys=True)
    if os.environ.get("KUBEFORGE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: KUBEFORGE_UPDATE_GOLDEN=1 to write it, then review it"
    assert text == path.read_text(), f"{path} differs from the builder's output; review and update on purpose"


def test_golden_two_node_eight_gpu_job():
    _golden("finetune-two-node.yaml", fb.build("llama-ft", NS, UID, two_node()))


def test_golden_minimal_job():
    _golden("finetune-minimal.yaml", fb.build("tiny", NS, UID, spec()))


def test_build_is_deterministic_and_ordered():
    a = fb.build("llama-ft", NS, UID, two_node())
    b = fb.build("llama-ft", NS, UID, two_node())
    assert a == b
    assert [o["kind"] for o in a] == ["Service", "ConfigMap", "Job"]
    assert [o["metadata"]["name"] for o in a] == ["llama-ft", "llama-ft-config", "llama-ft"]
    for obj in a:
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "name": "llama-ft",
                         "uid": UID, "controller": True, "blockOwnerDeletion": True}
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubeforge"
        assert obj["metadata"]["labels"]["kubeforge.io/finetunejob"] == "llama-ft"


# --- the config ---------------------------------------------------------------------------------

def test_config_is_the_contract_subset_and_the_trainer_parses_it():
    cfg = fb.render_config("llama-ft", NS, two_node())
    assert list(cfg) == ["kind", "name", "namespace", "model", "dataset", "method", "lora", "parallelism",
                         "training", "checkpoint", "output"]
    assert cfg["kind"] == "FineTuneJob" and cfg["name"] == "llama-ft" and cfg["namespace"] == NS
    assert cfg["dataset"] == {"uri": "pvc://data/train.jsonl", "format": "chat", "validationUri": "pvc://data/val.jsonl",
                              "validationSplit": 0.05, "sequenceLength": 512, "packing": True, "redact": []}
    assert cfg["parallelism"] == {"tensor": 2, "pipeline": 1, "strategy": "fsdp", "pipelineSchedule": "1F1B"}
    assert cfg["training"]["maxSteps"] == 1000 and cfg["training"]["precision"] == "bf16"
    assert cfg["checkpoint"] == {"intervalSteps": 50, "keepLast": 2, "uri": "pvc://scratch/ckpt"}
    assert cfg["output"] == {"uri": "pvc://models/out", "format": "adapter"}
    # Nothing of the pod side leaks in (nodes, resources, template, lifecycle knobs).
    assert not {"nodes", "resources", "template", "suspend", "backoffLimit", "maxRestarts"} & set(cfg)
    # The trainer's own strict parser accepts it as is, through JSON as in the pod.
    parsed = parse_config(json.loads(json.dumps(cfg)))
    assert parsed.training.maxSteps == 1000 and parsed.dataset.validationSplit == 0.05
    assert parsed.lora.targetModules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_config_omits_unset_optionals_and_keeps_every_default_explicit():
    cfg = fb.render_config("tiny", NS, spec(method="full"))
    assert "validationUri" not in cfg["dataset"] and "maxSteps" not in cfg["training"]
    assert "uri" not in cfg["checkpoint"]
    # The API's defaults differ from the trainer's (precision, validationSplit): all written out.
    assert cfg["training"]["precision"] == "bf16" and cfg["dataset"]["validationSplit"] == 0.05
    assert cfg["method"] == "full"
    assert parse_config(cfg).method == "full"


def test_config_map_holds_config_json():
    cm = fb.config_map("tiny", NS, UID, spec())
    assert cm["metadata"]["name"] == "tiny-config"
    assert json.loads(cm["data"][contract.CONFIG_FILE]) == fb.render_config("tiny", NS, spec())


# --- the Service ----------------------------------------------------------------------------------

def test_headless_service_publishes_the_not_ready_rank_0_pod_for_the_rendezvous():
    svc = fb.service("llama-ft", NS, UID)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    # Only the index-0 worker: its name is the one the workers resolve (rendezvous, MASTER_ADDR).
    assert svc["spec"]["selector"] == {"app.kubernetes.io/instance": "llama-ft", "kubeforge.io/finetunejob": "llama-ft",
                                       "batch.kubernetes.io/job-completion-index": "0"}
    assert svc["spec"]["ports"][0]["port"] == contract.RENDEZVOUS_PORT
    env = {e["name"]: e.get("value") for e in _container(fb.job("llama-ft", NS, UID, spec()))["env"]}
    rank0 = f"llama-ft-0.{svc['metadata']['name']}"
    assert env["PET_RDZV_ENDPOINT"] == f"{rank0}:{contract.RENDEZVOUS_PORT}" and env["MASTER_ADDR"] == rank0


# --- the Job ------------------------------------------------------------------------------------------

def _container(job: dict) -> dict:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def _env(job: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(job)["env"]}


def test_indexed_job_runs_launch_then_elastic_torchrun():
    job = fb.job("llama-ft", NS, UID, two_node())
    s = job["spec"]
    assert (s["completionMode"], s["completions"], s["parallelism"]) == ("Indexed", 2, 2)
    assert s["backoffLimit"] == 4 and s["activeDeadlineSeconds"] == 86400 and s["suspend"] is False
    assert s["podReplacementPolicy"] == "Failed" and "successPolicy" not in s
    cmd = _container(job)["command"]
    assert cmd[:6] == ["python", "-m", "kubeforge_runtime.launch", "--config", "/etc/kubeforge/config.json", "--"]
    assert cmd[6:] == [
        "torchrun", "--nnodes=2:2", "--nproc-per-node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=llama-ft-0.llama-ft:29400", f"--rdzv-id={UID}", "--max-restarts=5",
        "-m", "kubeforge_runtime.train", "--config", "/etc/kubeforge/config.json",
    ]
    env = _env(job)
    assert {k: env[k] for k in contract.TORCHRUN_ENV} == {
        "PET_NNODES": "2:2", "PET_NPROC_PER_NODE": "8",
        "PET_NODE_RANK": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}},
        "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "llama-ft-0.llama-ft:29400", "PET_RDZV_ID": UID,
        "PET_MAX_RESTARTS": "5", "MASTER_ADDR": "llama-ft-0.llama-ft", "MASTER_PORT": "29500",
    }
    assert env[contract.ENV_METRICS_PORT] == "9090"
    assert env[contract.ENV_JOB_NAME] == "llama-ft" and env[contract.ENV_NAMESPACE] == NS
    assert job["spec"]["template"]["spec"]["subdomain"] == "llama-ft"


def test_pod_failure_policy_fails_on_config_error_and_ignores_disruptions():
    rules = fb.job("tiny", NS, UID, spec())["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                              "values": [contract.EXIT_CONFIG_ERROR]}}
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


def test_gpus_resources_and_hardening():
    job = fb.job("llama-ft", NS, UID, two_node())
    pod = job["spec"]["template"]["spec"]
    c = _container(job)
    assert c["resources"] == {"limits": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"},
                              "requests": {"cpu": "32", "memory": "256Gi"}}
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_no_gpus_means_no_gpu_limit_and_one_process_per_node():
    job = fb.job("tiny", NS, UID, spec())
    assert "nvidia.com/gpu" not in _container(job)["resources"].get("limits", {})
    assert "--nproc-per-node=1" in _container(job)["command"]
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)


def test_explicit_procs_per_node_wins_over_gpus():
    job = fb.job("x", NS, UID, spec(resources={"gpus": 8}, procsPerNode=4))
    assert "--nproc-per-node=4" in _container(job)["command"] and _env(job)["PET_NPROC_PER_NODE"] == "4"


def test_elastic_range_sets_nnodes_and_a_success_policy():
    job = fb.job("x", NS, UID, spec(nodes={"min": 2, "max": 4}))
    assert "--nnodes=2:4" in _container(job)["command"] and _env(job)["PET_NNODES"] == "2:4"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert job["spec"]["successPolicy"] == {"rules": [{"succeededCount": 2}]}


def test_suspend_and_deadline():
    job = fb.job("x", NS, UID, spec(suspend=True))
    assert job["spec"]["suspend"] is True and "activeDeadlineSeconds" not in job["spec"]


def test_kueue_queue_label_leaves_suspend_to_kueue_and_labels_job_and_pods():
    job = fb.job("x", NS, UID, spec(template={"labels": {"kueue.x-k8s.io/queue-name": "gpu"}}))
    assert "suspend" not in job["spec"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert job["spec"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    # ... unless the user suspends it.
    assert fb.job("x", NS, UID, spec(suspend=True, template={"labels": {"kueue.x-k8s.io/queue-name": "gpu"}}))["spec"]["suspend"] is True


def test_pvc_claims_mounted_once_each_where_the_runtime_looks():
    job = fb.job("llama-ft", NS, UID, two_node())
    pod = job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"models": "pvc-models", "data": "pvc-data", "scratch": "pvc-scratch"}
    mounts = {m["name"]: m["mountPath"] for m in _container(job)["volumeMounts"]}
    assert mounts["pvc-models"] == "/mnt/pvc/models" and mounts["pvc-scratch"] == "/mnt/pvc/scratch"
    assert mounts["kubeforge-config"] == contract.CONFIG_DIR and mounts["dshm"] == "/dev/shm"
    # Without pvc:// URIs there are none.
    pod = fb.job("tiny", NS, UID, spec())["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]


def test_template_overrides_pass_through():
    tmpl = {
        "image": "registry.example/kubeforge/runtime:1.2", "imagePullPolicy": "Always",
        "labels": {"team": "nlp"}, "annotations": {"prometheus.io/scrape": "true"},
        "nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}}, "priorityClassName": "high", "schedulerName": "volcano",
        "serviceAccountName": "trainer",
        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        "volumes": [{"name": "extra", "emptyDir": {}}], "volumeMounts": [{"name": "extra", "mountPath": "/extra"}],
    }
    job = fb.job("x", NS, UID, spec(template=tmpl))
    meta, pod = job["spec"]["template"]["metadata"], job["spec"]["template"]["spec"]
    c = _container(job)
    assert c["image"] == tmpl["image"] and c["imagePullPolicy"] == "Always"
    assert meta["labels"]["team"] == "nlp" and job["metadata"]["labels"]["team"] == "nlp"
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    assert meta["annotations"]["kubectl.kubernetes.io/default-container"] == "trainer"
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"] == tmpl["tolerations"]
    assert pod["affinity"] == {"nodeAffinity": {}} and pod["priorityClassName"] == "high"
    assert pod["schedulerName"] == "volcano" and pod["serviceAccountName"] == "trainer"
    assert pod["automountServiceAccountToken"] is False
    assert _env(job)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert {"name": "extra", "emptyDir": {}} in pod["volumes"]
    assert {"name": "extra", "mountPath": "/extra"} in c["volumeMounts"]
    # Our own labels win over the template's (selectors must stay ours). The API refuses a
    # kubeforge.io/ label in template.labels (tests/unit/test_api_rules.py); the builder does
    # not rely on that alone.
    s = spec()
    s.template.labels = {"kubeforge.io/finetunejob": "other"}
    job = fb.job("x", NS, UID, s)
    assert job["spec"]["template"]["metadata"]["labels"]["kubeforge.io/finetunejob"] == "x"


def test_default_image_comes_from_the_operator_environment(monkeypatch):
    monkeypatch.setenv("KUBEFORGE_RUNTIME_IMAGE", "registry.example/runtime:9")
    assert _container(fb.job("x", NS, UID, spec()))["image"] == "registry.example/runtime:9"


@pytest.mark.parametrize("name, ok", [
    ("llama-ft", True), ("a", True), ("x" * 52, True),
    ("x" * 53, False), ("9lives", False), ("has.dot", False), ("UPPER", False),
])
def test_names_usable_for_children(name, ok):
    assert (fb.name_problem(name) is None) is ok


def test_checkpoint_uri_defaults_under_the_output():
    assert fb.checkpoint_uri(spec()) == "s3://models/out/checkpoints"
    assert fb.checkpoint_uri(two_node()) == "pvc://scratch/ckpt"


# --- the data gate (spec.dataset.checks) ----------------------------------------------------------

CHECKS = {"maxDuplicateShare": 0.1, "minRecords": 100}


def gated(**over) -> FineTuneJobSpec:
    """A GPU job with checks, S3 credentials, a pvc:// dataset and pod overrides (queued by Kueue)."""
    base = {
        "model": {"uri": "s3://models/base"},
        "dataset": {"uri": "pvc://data/train.jsonl", "format": "prompt-completion", "checks": CHECKS},
        "output": {"uri": "s3://models/out"}, "nodes": {"min": 2, "max": 2}, "resources": {"gpus": 8, "memory": "256Gi"},
        "storage": {"s3": {"credentialsSecretRef": {"name": "minio-creds"}, "endpoint": "http://minio:9000"}},
        "template": {"image": "registry.example/kf:1", "labels": {"team": "nlp", fb.KUEUE_QUEUE_LABEL: "gpu"},
                     "env": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
                     "nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
                     "volumes": [{"name": "ca", "configMap": {"name": "ca-bundle"}}],
                     "volumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/extra"}]},
    }
    base.update(over)
    return FineTuneJobSpec.model_validate(base)


def test_golden_data_gate():
    _golden("finetune-datacheck.yaml", fb.gate_children("llama-ft", NS, UID, gated()))


def test_the_gate_is_one_small_cpu_pod_hardened_and_fed_like_the_workers():
    sp = gated()
    gate = fb.datacheck_job("llama-ft", NS, UID, sp)
    worker = fb.job("llama-ft", NS, UID, sp)
    assert gate["metadata"]["name"] == "llama-ft-datacheck"
    assert gate["spec"]["completions"] == gate["spec"]["parallelism"] == 1
    assert "completionMode" not in gate["spec"] and gate["spec"]["suspend"] is False
    gp, wp = gate["spec"]["template"]["spec"], worker["spec"]["template"]["spec"]
    (gc,), (wc,) = gp["containers"], wp["containers"]
    assert gc["command"] == ["python", "-m", "kubeforge_runtime.launch", "--config",
                             f"{contract.CONFIG_DIR}/{contract.CONFIG_FILE}", "--data-check"]
    # No GPU, small requests; the worker asks for 8 GPUs and 256Gi.
    assert gc["resources"] == fb.DATACHECK_RESOURCES and "nvidia.com/gpu" not in json.dumps(gc["resources"])
    assert wc["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # Same image, same hardening, same config, same credentials, same user volumes.
    assert gc["image"] == wc["image"] == "registry.example/kf:1"
    assert gc["securityContext"] == wc["securityContext"] and gp["securityContext"] == wp["securityContext"]
    assert gp["automountServiceAccountToken"] is False and gp["restartPolicy"] == "Never"
    by_name = {e["name"]: e for e in wc["env"]}
    for e in gc["env"]:
        assert by_name[e["name"]] == e, e["name"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "HTTPS_PROXY"} <= {e["name"] for e in gc["env"]}
    assert not any(e["name"].startswith("PET_") for e in gc["env"])
    gate_vols = {v["name"]: v for v in gp["volumes"]}
    assert gate_vols[common_config_volume()]["configMap"]["name"] == "llama-ft-config"
    assert gate_vols["pvc-data"]["persistentVolumeClaim"]["claimName"] == "data" and "ca" in gate_vols
    assert "dshm" not in gate_vols
    assert {m["mountPath"] for m in gc["volumeMounts"]} >= {"/etc/ssl/extra", f"{contract.DEFAULT_PVC_ROOT}/data"}
    assert gp["nodeSelector"] == wp["nodeSelector"] and gp["tolerations"] == wp["tolerations"]
    # A crossed line (exit 78) fails the gate at once; other failures are retried twice.
    assert gate["spec"]["backoffLimit"] == fb.DATACHECK_BACKOFF_LIMIT
    assert gate["spec"]["podFailurePolicy"]["rules"][0] == {
        "action": "FailJob", "onExitCodes": {"containerName": "datacheck", "operator": "In",
                                             "values": [contract.EXIT_CONFIG_ERROR]}}


def common_config_volume() -> str:
    from kubeforge.builders import common

    return common.CONFIG_VOLUME


def test_the_gate_is_selected_like_the_workers_but_kept_out_of_kueue():
    """The pod carries the job's selector labels (the workers' NetworkPolicy covers it; the
    operator hears its events) but not the queue label: the gate is not a queued workload."""
    from kubeforge.builders import network

    sp = gated()
    gate = fb.datacheck_job("llama-ft", NS, UID, sp)
    pod_labels = gate["spec"]["template"]["metadata"]["labels"]
    pol = network.finetune_policy("llama-ft", NS, UID, network.NetworkPolicySettings())
    assert pol["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels["kubeforge.io/finetunejob"] == "llama-ft" and pod_labels["team"] == "nlp"
    assert fb.KUEUE_QUEUE_LABEL not in pod_labels and fb.KUEUE_QUEUE_LABEL not in gate["metadata"]["labels"]
    assert pod_labels["app.kubernetes.io/component"] == "datacheck"


def test_the_gate_reads_the_workers_config_and_holds_while_suspended():
    sp = gated(suspend=True)
    cm, gate = fb.gate_children("llama-ft", NS, UID, sp)
    assert cm == fb.config_map("llama-ft", NS, UID, sp)
    assert json.loads(cm["data"][contract.CONFIG_FILE])["dataset"]["checks"] == CHECKS
    assert gate["spec"]["suspend"] is True


def test_the_gate_mounts_only_what_it_reads():
    sp = spec(model={"uri": "pvc://models/base"}, dataset={"uri": "pvc://data/t.jsonl", "checks": CHECKS},
              output={"uri": "pvc://out/o"}, checkpoint={"uri": "pvc://scratch/c"})
    claims = {v["persistentVolumeClaim"]["claimName"]
              for v in fb.datacheck_job("x", NS, UID, sp)["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {"models", "data"}


def test_longest_name_still_gives_a_valid_gate_job_name():
    name = "a" * fb.MAX_NAME_LENGTH
    assert fb.name_problem(name) is None
    assert len(fb.Names.of(name).datacheck) <= 63


def test_only_a_set_red_line_needs_the_gate():
    """The CRD defaults dataset.checks to {} on the cluster: an empty object is no gate."""
    assert not fb.needs_data_gate(spec())
    assert not fb.needs_data_gate(spec(dataset={"uri": "s3://d/t.jsonl", "checks": {}}))
    assert fb.needs_data_gate(spec(dataset={"uri": "s3://d/t.jsonl", "checks": {"minRecords": 1}}))
