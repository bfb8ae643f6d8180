"""The FineTuneJob pod's entry point: check the config, then exec torchrun.

The operator runs every training pod as::

    python -m kubeforge_runtime.launch --config /etc/kubeforge/config.json -- \\
        torchrun [torchrun flags] -m kubeforge_runtime.train --config /etc/kubeforge/config.json

torchrun reports a failed worker with its own exit code (1), so a configuration error found
inside the workers would look like a crash and be retried. This preflight finds those errors
first and exits with ``contract.EXIT_CONFIG_ERROR`` (78) and a message saying what to
change; the Job's podFailurePolicy can then fail the Job at once. Checks:

* the config parses (strict: unknown keys, types, ranges);
* the model directory is readable and holds a transformers config;
* the data files exist and every record parses (bad records listed as file:line); with
  ``dataset.redact`` the personal data found per kind is logged;
* a ``deepspeed-zero*`` strategy finds the deepspeed package;
* with ``distillation``: the teacher directory holds a transformers config and shares the
  student's tokenizer (vocabulary, special tokens, output vocabulary size), else exit 78
  naming both models (``train/distill.py``);
* the parallel degrees fit the world size (``--nnodes`` x ``--nproc-per-node`` from the
  torchrun arguments, else ``PET_NNODES`` x ``PET_NPROC_PER_NODE``) and the model's sizes;
* the output and checkpoint URIs are writable kinds: file:// or pvc://, or s3:// when boto3 is
  installed and S3 credentials are present (else the message names what to set);
* the newest checkpoint in the checkpoint directory (for s3://, the newest remote state file), if any, is this run's (same job, base
  model, dataset, method and LoRA shape; ``train/checkpoint.py``): another run's is refused
  before torchrun starts, so nothing is loaded and no checkpoint is pruned.
* with ``$KUBEFORGE_GPU_MEMORY``, the fit check (``fit.py``): the layout's estimated peak per
  GPU, from the model's config.json, within that memory (the webhook checks only the models
  it knows without downloading them);
* last, the data red lines of ``dataset.checks`` (``datacheck.py``), measured on the training
  file with the model's tokenizer. A crossed line exits 78 too, but the termination log gets a
  ``DataQualityReport`` JSON (measurements, thresholds, violations, message) that the operator
  turns into reason ``DataQualityFailed`` and ``status.result.dataQuality``. Passing
  measurements are logged and handed to the trainer in ``$KUBEFORGE_DATA_QUALITY`` (the
  environment survives the exec), which puts them in its result and the lineage record.

``--data-check`` runs only that last check (no command, no model unless ``maxOverlongShare``
needs its tokenizer): the FineTuneJob's data gate pod (``<name>-datacheck``, one small CPU pod
the operator runs before it creates any worker). It writes the ``DataQualityReport`` to the
termination log whether the data passes (exit 0) or not (exit 78); a config or file it cannot
use exits 78 with the message as any preflight error, a failed download 1.

The message also goes to ``/dev/termination-log`` when it exists (or to
``$KUBEFORGE_REPORT_PATH``), so it shows in the pod's status. When everything passes, the process ``os.execvp``s the command after ``--`` (torchrun
then is PID 1's replacement and receives the pod's signals directly). Without a command it
only checks (exit 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import contract

if TYPE_CHECKING:
    from . import datacheck
    from .train.config import TrainConfig

log = logging.getLogger("kubeforge_runtime.launch")


def _flag(args: list[str], *names: str) -> str | None:
    """The value of a ``--name=value`` / ``--name value`` flag in a torchrun command line."""
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def world_size_from(command: list[str]) -> int | None:
    """nnodes x nproc-per-node of a torchrun command (or the PET_* environment); None when it
    cannot be known before start (``--nproc-per-node=gpu/auto``)."""
    nnodes = _flag(command, "--nnodes") or os.environ.get("PET_NNODES") or "1"
    nproc = _flag(command, "--nproc-per-node", "--nproc_per_node") or os.environ.get("PET_NPROC_PER_NODE") or "1"
    # An elastic range "MIN:MAX": every size in it must fit; check the largest here and
    # let the trainer check the actual size when it starts.
    nnodes = nnodes.split(":")[-1]
    if not nnodes.isdigit() or not nproc.isdigit():
        return None
    return int(nnodes) * int(nproc)


def preflight(config_path: str, command: list[str]) -> None:
    """Raise a configuration error (ConfigError/DataError/StorageError/ModelLoadError)."""
    from . import data, models, storage
    from .train import strategy
    from .train.config import ConfigError, load_config
    from .train.parallel_dims import ModelShape, ParallelDims

    cfg = load_config(config_path)
    strategy.check_available(cfg.parallelism.strategy)  # e.g. ZeRO in an image without DeepSpeed
    model_dir, hf_cfg = _model_config("model.uri", cfg.model.uri,
                                      "an adapter cannot be fine-tuned; point at the base or merged model")
    teacher_cfg = None
    if cfg.distillation is not None:
        # Downloaded here like the model (hf://, s3:// into the cache), then compared with it.
        from .train import distill

        teacher_uri = cfg.distillation.teacher.uri
        teacher_dir, teacher_cfg = _model_config("distillation.teacher.uri", teacher_uri,
                                                 "an adapter cannot be a teacher; point at a merged model")
        distill.check_same_tokenizer(cfg.model.uri, model_dir, teacher_uri, teacher_dir)
    for uri in (cfg.dataset.uri, cfg.dataset.validationUri):
        if uri:
            path = storage.resolve(uri)
            if not path.is_file():
                raise ConfigError(f"dataset {uri!r}: {path} is not a file (give one JSONL file)")
            # Bad lines of the training file are the maxUnparseableShare check's to judge.
            skip = uri == cfg.dataset.uri and cfg.dataset.skip_unparseable
            records = data.load_records(path, cfg.dataset.format, skip_bad=skip)
            if cfg.dataset.redact:  # shown before training starts; the trainer reports its own counts
                _, counts = data.redact_records(records, cfg.dataset.redact)
                log.info("dataset %s: %d records; dataset.redact replaces %s", uri, len(records),
                         data.format_redactions(counts, cfg.dataset.redact))
    storage.check_output_uri(cfg.output.uri, "output.uri")
    if cfg.checkpoint.uri:
        storage.check_output_uri(cfg.checkpoint.uri, "checkpoint.uri")
    from .train import checkpoint

    checkpoint.check_resumable(cfg)  # CheckpointMismatch is a ConfigError
    world = world_size_from(command) if command else None
    if world is not None:
        t = cfg.training
        try:
            shape = ModelShape.from_hf_config(hf_cfg)
        except AttributeError as exc:
            raise ConfigError(f"model.uri: {type(hf_cfg).__name__} is not a decoder-only LM this trainer supports ({exc})")
        ParallelDims(world_size=world, tp=cfg.parallelism.tensor, pp=cfg.parallelism.pipeline,
                     global_batch_size=t.globalBatchSize, micro_batch_size=t.microBatchSize,
                     pipeline_schedule=cfg.parallelism.pipelineSchedule, model=shape)
        if teacher_cfg is not None and cfg.parallelism.tensor > 1:
            # The teacher is tensor-parallelised like the student: its sizes must divide too.
            try:
                ParallelDims(world_size=cfg.parallelism.tensor, tp=cfg.parallelism.tensor, pp=1,
                             global_batch_size=t.microBatchSize, micro_batch_size=t.microBatchSize,
                             model=ModelShape.from_hf_config(teacher_cfg))
            except ConfigError as exc:
                raise ConfigError(f"distillation.teacher: {exc}") from None
    check_fit(cfg, hf_cfg.to_dict(), command, teacher_cfg.to_dict() if teacher_cfg is not None else None)
    check_data(cfg, model_dir)


def _model_config(field: str, uri: str, adapter_hint: str) -> tuple[Path, Any]:
    """The local directory of the model at ``uri`` (downloaded if remote) and its transformers
    config; a ConfigError/ModelLoadError naming ``field`` when there is none or it is unreadable."""
    from transformers import AutoConfig

    from . import models
    from .train.config import ConfigError

    model_dir = models.resolve_model_dir(uri)
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"{field} {uri!r}: {model_dir} has no config.json ({adapter_hint})")
    try:
        return model_dir, AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise models.ModelLoadError(f"{field} {uri!r}: unreadable config.json ({exc})") from exc


def check_fit(cfg: TrainConfig, hf_config: dict, command: list[str], teacher_config: dict | None = None) -> None:
    """The fit check the webhook makes for models it knows, here for every model: with
    ``$KUBEFORGE_GPU_MEMORY``, a layout whose estimated peak per GPU exceeds it is a
    ConfigError naming the estimate, the limit and the nearest layout that fits (a
    distillation teacher's ``teacher_config`` counted where the trainer holds it)."""
    from . import fit
    from .train.config import ConfigError

    raw = os.environ.get(contract.ENV_GPU_MEMORY, "").strip()
    if not raw or not command:
        return
    value, _, source = raw.partition(" ")
    nnodes = (_flag(command, "--nnodes") or os.environ.get("PET_NNODES") or "1").split(":")[0]
    nproc = _flag(command, "--nproc-per-node", "--nproc_per_node") or os.environ.get("PET_NPROC_PER_NODE") or "1"
    if not (value.isdigit() and nnodes.isdigit() and nproc.isdigit()):
        return
    limit, source = int(value), source.strip("()") or contract.ENV_GPU_MEMORY
    arch = fit.Architecture.from_hf_config(hf_config)
    # The fewest nodes shard least: the most memory per GPU (as the webhook judges nodes.min).
    plan = fit.TrainPlan.from_spec(cfg.model_dump(), world=int(nnodes) * int(nproc))
    extra = [fit.teacher_term(fit.Architecture.from_hf_config(teacher_config))] if teacher_config else []
    est = fit.estimate_training(arch, plan, extra=extra)
    if est.peak > limit:
        raise ConfigError("spec.resources: " + fit.misfit_message("this layout", est, limit, source,
                                                                 fit.nearest_fit(arch, plan, limit, extra=extra)))
    log.info("fit check: estimated peak %s per GPU within %s (%s)", fit.gib(est.peak), fit.gib(limit), source)


def data_report(cfg: TrainConfig, model_dir: Path | None) -> "datacheck.Report":
    """Measure the training file against ``dataset.checks`` (which must be set).

    ``model_dir``: the model whose tokenizer the trainer will use, so "overlong" means what
    training will truncate; None loads it only when ``maxOverlongShare`` is set (the data gate,
    which should not fetch a model it does not need)."""
    from . import datacheck, models, storage

    checks = cfg.dataset.checks
    assert checks is not None
    tokenizer = None
    if model_dir is not None:
        tokenizer = models.load_tokenizer(model_dir)
    elif checks.maxOverlongShare is not None:
        tokenizer = models.load_tokenizer(cfg.model.uri)
    return datacheck.check_file(storage.resolve(cfg.dataset.uri), cfg.dataset.format, checks.model_dump(),
                                tokenizer=tokenizer, sequence_length=cfg.dataset.sequenceLength)


def check_data(cfg: TrainConfig, model_dir: Path) -> None:
    """The ``dataset.checks`` red lines on the training file; raise ``DataQualityError`` when
    one is crossed, else log the measurements and hand them to the exec'd trainer."""
    from . import datacheck

    os.environ.pop(contract.ENV_DATA_QUALITY, None)  # never pass on a value from elsewhere
    if cfg.dataset.checks is None:
        return
    report = data_report(cfg, model_dir)
    if not report.passed:
        raise datacheck.DataQualityError(report)
    log.info("%s", report.message())
    os.environ[contract.ENV_DATA_QUALITY] = json.dumps(report.result(), separators=(",", ":"))


def data_gate(config_path: str) -> int:
    """``--data-check``: only the ``dataset.checks`` red lines, for the operator's data gate pod.

    Writes the :data:`contract.DATA_QUALITY_REPORT_KIND` JSON to the termination log either
    way (``passed`` true or false) and returns 0 when every line holds, EXIT_CONFIG_ERROR when
    one is crossed. Raises what :func:`preflight` raises for a config or data file it cannot use.
    """
    from .train.config import ConfigError, load_config

    cfg = load_config(config_path)
    if cfg.dataset.checks is None:
        raise ConfigError("dataset.checks is not set: the data gate has nothing to check")
    report = data_report(cfg, None)
    term = contract.termination_log_path()
    if term is not None:
        try:
            term.write_text(report.termination_report())
        except OSError:
            pass
    if not report.passed:
        sys.stderr.write(f"kubeforge: {report.message()}\n")
        return contract.EXIT_CONFIG_ERROR
    log.info("%s", report.message())
    return contract.EXIT_OK


def _report(message: str, body: str | None = None) -> None:
    """``message`` to stderr and ``body`` (default: the message) to the termination log."""
    sys.stderr.write(f"kubeforge: configuration error: {message}\n")
    # The kubelet provides the termination log (and copies it into the pod status); never
    # create it elsewhere. $KUBEFORGE_REPORT_PATH redirects it for local runs and tests.
    term = contract.termination_log_path()
    if term is not None:
        try:
            term.write_text((body or f"configuration error: {message}\n")[:4000])  # the kubelet keeps 4 KiB
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python -m kubeforge_runtime.launch",
                                     description="Check a FineTuneJob config, then exec the command after --.")
    parser.add_argument("--config", default=os.path.join(contract.CONFIG_DIR, contract.CONFIG_FILE))
    parser.add_argument("--data-check", action="store_true",
                        help="only measure the dataset.checks red lines (the operator's data gate pod); no command")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launch %(levelname)s: %(message)s")

    from . import data, datacheck, models, storage
    from .train.config import ConfigError

    try:
        if args.data_check:
            if command:
                parser.error("--data-check runs no command")
            return data_gate(args.config)
        preflight(args.config, command)
    except datacheck.DataQualityError as exc:
        _report(str(exc), exc.report.termination_report())
        return contract.EXIT_CONFIG_ERROR
    except (ConfigError, data.DataError, storage.StorageError, models.ModelLoadError) as exc:
        _report(str(exc))
        return contract.EXIT_CONFIG_ERROR
    except storage.DownloadFailed as exc:  # transient (network, server): exit 1, the Job retries the pod
        sys.stderr.write(f"kubeforge: {exc}\n")
        return 1
    if not command:
        log.info("config %s is valid", args.config)
        return contract.EXIT_OK
    log.info("config valid; exec %s", " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as exc:  # the command itself is missing: the image is broken, not the config
        sys.stderr.write(f"kubeforge: cannot exec {command[0]!r}: {exc}\n")
        return 127
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
