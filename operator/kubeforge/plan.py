"""``kubeforge plan -f FILE``: the fit check's estimate and the layouts around it, as tables.

For each FineTuneJob and InferenceService of the file: the estimated peak memory per GPU,
term by term (:mod:`kubeforge_runtime.fit`), against the limit the spec gives
(:func:`kubeforge.fit.gpu_limit`) or ``--gpu-memory``; for a FineTuneJob also the nearest
alternative layouts (fewest changed fields first, those that fit first), each with its own
estimate. Offline: nothing is read from a cluster. Rendered with rich.
"""

from __future__ import annotations

from typing import Any, Iterable

from kubeforge_runtime import fit as rfit

from . import fit


def _limit(spec: dict[str, Any], override: str | None) -> tuple[dict[str, Any], bool]:
    """The spec with ``--gpu-memory`` put in resources.gpuMemory when it has no limit of its own."""
    if override and fit.gpu_limit(spec) is None:
        spec = {**spec, "resources": {**(spec.get("resources") or {}), "gpuMemory": override}}
        return spec, True
    return spec, False


def _terms_table(title: str, est: rfit.Estimate) -> Any:
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    table.add_column("term")
    table.add_column("GiB", justify="right")
    for name, value in est.terms.items():
        table.add_row(name, f"{value / 2**30:.2f}")
    table.add_row(f"[bold]peak ({est.phase} phase)[/bold]", f"[bold]{est.peak / 2**30:.2f}[/bold]")
    for phase, value in est.phases.items():
        if phase != est.phase:
            table.add_row(f"[dim]{phase} phase[/dim]", f"[dim]{value / 2**30:.2f}[/dim]")
    return table


def _alternatives_table(report: fit.FitReport, count: int) -> Any:
    from rich.table import Table

    table = Table(title="alternative layouts (fewest changes first)")
    table.add_column("changes")
    table.add_column("peak GiB", justify="right")
    table.add_column("fits", justify="center")
    for alt in report.alternatives[:count]:
        ok = report.limit is None or alt.estimate.peak <= report.limit
        table.add_row(", ".join(alt.changes), f"{alt.estimate.peak / 2**30:.2f}", "yes" if ok else "no")
    return table


def render_plans(resources: Iterable[Any], limit: str | None = None, count: int = 8) -> int:
    """Print the plans; 1 when some resource does not fit, else 0."""
    from rich.console import Console

    console = Console()
    misfit = False
    for res in resources:
        if res.kind not in ("FineTuneJob", "InferenceService"):
            continue
        spec, _ = _limit(res.spec.to_api(), limit)
        head = f"{res.kind}/{res.name}"
        try:
            report = (fit.check_finetune(spec, with_alternatives=True) if res.kind == "FineTuneJob"
                      else fit.check_inference(spec))
        except ValueError as exc:
            console.print(f"[red]{head}: spec.{exc}[/red]", soft_wrap=True)
            misfit = True
            continue
        if not report.checked:
            console.print(f"{head}: not estimated: " + (report.warning or "no GPU memory given (resources.gpuMemory, "
                          "a nvidia.com/gpu.memory nodeSelector, or --gpu-memory)"))
            continue
        assert report.estimate is not None and report.limit is not None
        verdict = "fits" if report.fits else "DOES NOT FIT"
        console.print(f"[bold]{head}: {verdict} in {fit.gib(report.limit)} ({report.source})[/bold]", soft_wrap=True)
        console.print(_terms_table("estimated peak per GPU", report.estimate))
        if res.kind == "FineTuneJob":
            plan = report.plan
            console.print(soft_wrap=True, *[f"layout: {plan.world} processes, data {plan.dp} x tensor {plan.tensor} x pipeline "
                          f"{plan.pipeline}, {plan.strategy}, method {plan.method}, micro-batch {plan.micro_batch} x "
                          f"{plan.sequence_length} tokens, checkpointing {'on' if plan.gradient_checkpointing else 'off'}"])
            console.print(_alternatives_table(report, count))
        if not report.fits:
            misfit = True
            console.print(f"[red]{report.message}[/red]", soft_wrap=True)
    return 1 if misfit else 0
