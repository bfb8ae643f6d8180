"""The vLLM pod of an InferenceService (``engine.backend: vllm``): golden tests of the pure
builders (:mod:`kubeforge.builders.vllm` through :func:`kubeforge.builders.inference.build_children`),
the API's refusals of what vLLM cannot do, and the QuantizeJob methods it loads."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubeforge.api.inference import InferenceServiceSpec
from kubeforge.builders import inference as ib
from kubeforge.builders import vllm
from kubeforge.controllers.inference import vllm_input_check
from kubeforge.controllers.references import resolve_uri
from kubeforge_runtime import fetch

UID = "uid-1"
MODEL = ib.ModelRef("s3://models/chat", "rev1")


def spec(**over) -> InferenceServiceSpec:
    base = {"model": {"uri": "s3://models/chat"}, "engine": {"backend": "vllm"}}
    base.update(over)
    return InferenceServiceSpec.model_validate(base)


def pod(s: InferenceServiceSpec, model: ib.ModelRef = MODEL) -> dict:
    return ib.build_children("chat", "ns", UID, s, model).deployment["spec"]["template"]["spec"]


def test_the_default_backend_is_kubeforge_and_its_pod_is_unchanged():
    s = InferenceServiceSpec.model_validate({"model": {"uri": "s3://models/chat"}})
    assert s.engine.backend == "kubeforge"
    p = pod(s)
    assert "initContainers" not in p
    assert p["containers"][0]["command"][:3] == ["python", "-m", "kubeforge_runtime.serve"]


def test_golden_vllm_pod():
    s = spec(engine={"backend": "vllm", "dtype": "bfloat16", "maxModelLength": 2048, "maxConcurrentRequests": 32,
                     "maxBatchTokens": 8192},
             adapters=[{"name": "sql", "uri": "pvc://adapters/sql"}, {"name": "support", "uri": "s3://ad/support"}],
             resources={"gpus": 4, "memory": "64Gi"}, apiKeySecretRef={"name": "chat-key", "key": "token"})
    p = pod(s)
    [c] = p["containers"]
    assert c["image"] == vllm.DEFAULT_VLLM_IMAGE == "vllm/vllm-openai:v0.32.0"
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert c["args"] == [
        "--model", "/workspace/models/base", "--served-model-name", "chat", "--host", "0.0.0.0", "--port", "8000",
        "--dtype", "bfloat16", "--max-num-seqs", "32", "--max-num-batched-tokens", "8192", "--enable-prefix-caching",
        "--max-model-len", "2048",
        "--enable-lora", "--max-loras", "2", "--lora-modules", "sql=/workspace/models/sql",
        "support=/workspace/models/support",
        "--tensor-parallel-size", "4",
    ]
    env = {e["name"]: e for e in c["env"]}
    # The key by reference, under vLLM's own variable, never in the arguments.
    assert env["VLLM_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "chat-key", "key": "token"}}
    assert "KUBEFORGE_API_KEY" not in env and not any("api-key" in a or "chat-key" in a for a in c["args"])
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["resources"] == {"limits": {"memory": "64Gi", "nvidia.com/gpu": "4"}, "requests": {"memory": "64Gi"}}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 1800
    # Restricted Pod Security on both containers.
    [init] = p["initContainers"]
    for container in (c, init):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"] and sc["readOnlyRootFilesystem"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # The fetch step: the runtime image, every model and adapter by name, the claims mounted.
    assert init["image"] == "kubeforge/runtime:0.1.0"
    assert init["command"] == ["python", "-m", "kubeforge_runtime.fetch", "--into", "/workspace/models",
                               "base=s3://models/chat", "sql=pvc://adapters/sql", "support=s3://ad/support"]
    assert "VLLM_API_KEY" not in {e["name"] for e in init["env"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["workspace"] == "/workspace" and mounts["pvc-adapters"] == "/mnt/pvc/adapters"
    assert mounts["dshm"] == "/dev/shm"
    assert {m["name"] for m in init["volumeMounts"]} == {"workspace", "pvc-adapters"}
    vols = {v["name"]: v for v in p["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize(("gpus", "flag"), [(0, None), (1, None), (2, "2"), (8, "8")])
def test_tensor_parallel_size_is_the_pods_gpu_count_when_more_than_one(gpus: int, flag: str | None):
    args = pod(spec(resources={"gpus": gpus}))["containers"][0]["args"]
    if flag is None:
        assert "--tensor-parallel-size" not in args
    else:
        assert args[args.index("--tensor-parallel-size") + 1] == flag


def test_no_adapters_no_lora_flags_and_defaults_rendered():
    args = pod(spec())["containers"][0]["args"]
    assert "--enable-lora" not in args and "--max-model-len" not in args
    assert args[args.index("--dtype") + 1] == "auto" and args[args.index("--max-num-seqs") + 1] == "16"


def test_prefix_caching_is_vllms_flag_both_ways():
    """vLLM's default for prefix caching depends on its platform; the spec's value is always passed."""
    assert "--enable-prefix-caching" in pod(spec(engine={"backend": "vllm"}))["containers"][0]["args"]
    args = pod(spec(engine={"backend": "vllm", "prefixCaching": False}))["containers"][0]["args"]
    assert "--no-enable-prefix-caching" in args and "--enable-prefix-caching" not in args


def test_image_from_the_operator_setting_and_the_template_override(monkeypatch):
    monkeypatch.setenv(vllm.VLLM_IMAGE_ENV, "mirror.example/vllm/vllm-openai:v0.32.0")
    assert pod(spec())["containers"][0]["image"] == "mirror.example/vllm/vllm-openai:v0.32.0"
    over = pod(spec(template={"image": "acme/vllm:custom", "imagePullPolicy": "Always"}))
    assert over["containers"][0]["image"] == "acme/vllm:custom"
    assert over["containers"][0]["imagePullPolicy"] == "Always"
    assert over["initContainers"][0]["image"] == "kubeforge/runtime:0.1.0"  # storage code stays the platform's


def test_service_has_no_grpc_port_and_hpa_pdb_are_the_same():
    s = spec(replicas={"min": 1, "max": 3}, autoscaling={"metric": "queueDepth", "target": 4})
    ch = ib.build_children("chat", "ns", UID, s, MODEL)
    assert [p["name"] for p in ch.service["spec"]["ports"]] == ["http"]
    assert ch.hpa is not None and ch.hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert ch.pdb["spec"]["maxUnavailable"] == 1
    for obj in (ch.deployment, ch.service, ch.hpa, ch.pdb):
        assert obj["metadata"]["ownerReferences"][0]["uid"] == UID


def test_a_new_model_revision_changes_the_pod_template():
    s = spec()
    a = ib.build_deployment("chat", "ns", UID, s, ib.ModelRef("pvc://m/out", "r1"))
    b = ib.build_deployment("chat", "ns", UID, s, ib.ModelRef("pvc://m/out", "r2"))
    assert a["spec"]["template"] != b["spec"]["template"]


@pytest.mark.parametrize(("engine", "field"), [
    ({"batching": "dynamic"}, "engine.batching"),
    ({"maxQueuedRequests": 10}, "engine.maxQueuedRequests"),
    ({"kvBlockSize": 32}, "engine.kvBlockSize"),
    ({"requestTimeoutSeconds": 30}, "engine.requestTimeoutSeconds"),
    ({"maxRequestBodyBytes": 4096}, "engine.maxRequestBodyBytes"),
])
def test_kubeforge_only_settings_are_refused_with_vllm_naming_the_field(engine: dict, field: str):
    with pytest.raises(ValidationError, match=f"{field}: .*use engine.backend: kubeforge"):
        spec(engine={"backend": "vllm", **engine})
    # The same settings are fine on the KubeForge server.
    InferenceServiceSpec.model_validate({"model": {"uri": "s3://m/x"}, "engine": engine})


def test_the_crd_carries_one_cel_rule_per_kubeforge_only_setting():
    from kubeforge.api.crd import all_crds

    crd = next(c for c in all_crds() if c["spec"]["names"]["kind"] == "InferenceService")
    engine = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["engine"]
    rules = engine["x-kubernetes-validations"]
    assert {r["fieldPath"] for r in rules} == {".batching", ".maxQueuedRequests", ".kvBlockSize",
                                              ".requestTimeoutSeconds", ".maxRequestBodyBytes"}
    assert engine["properties"]["backend"]["enum"] == ["kubeforge", "vllm"]


@pytest.mark.parametrize(("compile_", "eager"), [("off", True), ("auto", False), ("on", False)])
def test_compile_off_starts_vllm_eager_and_the_others_leave_its_compilation(compile_: str, eager: bool):
    args = pod(spec(engine={"backend": "vllm", "compile": compile_}))["containers"][0]["args"]
    assert ("--enforce-eager" in args) == eager
    assert (args[args.index("--optimization-level") + 1] == "0") if eager else "--optimization-level" not in args
    # Accepted by the CRD's rules too: no CEL rule names engine.compile.
    from kubeforge.api.crd import all_crds

    crd = next(c for c in all_crds() if c["spec"]["names"]["kind"] == "InferenceService")
    engine = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["engine"]
    assert not any("compile" in r["rule"] for r in engine["x-kubernetes-validations"])


@pytest.mark.parametrize(("method", "ok"), [("fp16", True), ("bf16", True), ("int8-weight-only", True),
                                            ("int8-dynamic", False), ("int4-weight-only", False)])
def test_quantize_methods_vllm_loads(method: str, ok: bool):
    job_spec = {"method": method, "quantizeEmbeddings": False}
    problem = vllm.vllm_quantize_problem(job_spec)
    assert (problem is None) == ok
    if not ok:
        assert method in problem and "int8-weight-only" in problem and "engine.backend: kubeforge" in problem
    # The operator turns the problem into a failed input (the webhook refuses it earlier).
    s = spec(model={"quantizeJobRef": {"name": "q"}})
    res = vllm_input_check(s, resolve_uri("pvc://m/q"), lambda kind, name: {"spec": job_spec})
    assert (res.state == "ready") == ok
    if not ok:
        assert res.message.startswith("spec.model.quantizeJobRef: engine.backend: vllm cannot load")


def test_quantized_embeddings_are_refused_for_vllm_with_the_field_to_change():
    """int8/int4 quantize the embedding too by default, with operators only KubeForge's runtime
    registers: vLLM needs quantizeEmbeddings: false (the default, unset, counts as true)."""
    for job_spec in ({"method": "int8-weight-only"}, {"method": "int8-weight-only", "quantizeEmbeddings": True}):
        problem = vllm.vllm_quantize_problem(job_spec)
        assert problem and "quantizeEmbeddings: false" in problem
    assert vllm.vllm_quantize_problem({"method": "bf16"}) is None  # nothing quantized to int


def test_the_kubeforge_backend_serves_any_quantize_output():
    s = InferenceServiceSpec.model_validate({"model": {"quantizeJobRef": {"name": "q"}}})
    res = vllm_input_check(s, resolve_uri("pvc://m/q"), lambda kind, name: {"spec": {"method": "int4-weight-only"}})
    assert res.state == "ready"


def test_fetch_links_each_name_to_the_resolved_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBEFORGE_PVC_ROOT", str(tmp_path / "pvc"))
    (tmp_path / "pvc" / "models" / "base").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    into = tmp_path / "ws" / "models"
    assert fetch.main(["--into", str(into), "base=pvc://models/base", f"sql=file://{tmp_path / 'plain'}"]) == 0
    assert (into / "base").resolve() == (tmp_path / "pvc" / "models" / "base").resolve()
    assert (into / "sql").resolve() == (tmp_path / "plain").resolve()
    assert fetch.main(["--into", str(into), "base=pvc://models/base"]) == 0  # idempotent (pod restarts)
    report = tmp_path / "report"
    monkeypatch.setenv("KUBEFORGE_REPORT_PATH", str(report))
    assert fetch.main(["--into", str(into), "base=pvc://models/missing"]) == 78
    assert "does not exist" in report.read_text()
    assert fetch.main(["--into", str(into), "no-equals-sign"]) == 78
