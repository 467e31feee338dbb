"""The plots of one ``starfish run``: its healing loss curve and per-block alignment before/after."""

from __future__ import annotations

from pathlib import Path

RUN_PLOTS = {
    "loss_curve.png": "Healing loss per optimizer step",
    "block_alignment.png": "Per-block cosine alignment with the dense model, before and after healing",
    "held_out_curve.png": "Budget auto: held-out objective and KL while healing, and the weights kept",
}


def write_run_plots(folder: Path, report: dict, loss_history: list[float] | None) -> list[str]:
    """Draw what the run has data for; returns the file names. Never fails the run over a plot."""
    from starfish.reporting import plots

    healer = report.get("healer", "healed")
    uses = {healer: bool(report.get("uses_labels"))}
    jobs = []
    if loss_history:
        jobs.append(("loss_curve.png", lambda p: plots.loss_curves([(f"{report['model']} — {healer}", {healer: loss_history})], p, relative=False, uses_labels=uses)))
    stopping = (report.get("heal") or {}).get("stopping")
    if stopping and stopping.get("curve"):
        curve_title = f"{report['model']} — {healer}, budget auto: {stopping.get('reason')}"
        jobs.append(("held_out_curve.png", lambda p: plots.held_out_curve(curve_title, stopping, p)))
    align = report.get("alignment") or {}
    if align.get("before") and align.get("after") and align["after"] != align["before"]:
        repair = report.get("repair", "none")
        start = "pruned" + (f" + {repair}" if repair and repair != "none" else "")
        series = {f"{start}, before healing": align["before"], healer: align["after"]}
        title = f"{report['model']} at {100 * report['sparsity']:.0f}% sparsity"
        jobs.append(("block_alignment.png", lambda p: plots.block_alignment([(title, series)], p, uses)))
    return plots.draw_each(jobs, folder)
