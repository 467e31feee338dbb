"""``starfish diagnose``: Relative Repairability of every prunable layer, as a table and a chart.

For each layer alone: prune it at ``--sparsity`` (magnitude), measure its output distortion on
unlabeled calibration images, apply variance matching, measure again; RR = residual / raw.
Writes ``rr.json`` (a list of {layer, params, raw, residual, rr, status}), ``rr.md`` and ``rr.png``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from starfish.errors import StarfishError
from starfish.experiments.run_config import RunConfig, validate


def diagnose(config: RunConfig, shrinkage: float = 0.0) -> list[dict]:
    """RR rows for every prunable layer of ``config.model`` at ``config.prune.sparsity`` (see
    ``starfish.pruning.repairability``), measured on the calibration images; validated like a run."""
    from starfish.nn.device import resolve_device
    from starfish.pruning.repairability import measure_rr
    from starfish.experiments.steps import build_model, load_data, stage_calibration
    from starfish.nn.structure import prunable_targets

    sparsity = config.prune.sparsity
    if not (0.0 < sparsity < 1.0):
        raise StarfishError(f"--sparsity must be in (0, 1) for a diagnosis; got {sparsity}.")
    if config.calib is None:
        raise StarfishError("diagnose measures each layer on calibration images: pass --calib DIR.")
    job = copy.deepcopy(config)
    job.heal.healer, job.repair = "none", "none"  # diagnose prunes and repairs one layer at a time itself
    validate(job)
    loaded = build_model(job)
    data = load_data(job, loaded, evaluation=False, held_out=False)
    net = loaded.module.to(resolve_device(job.heal.device)).eval()
    targets = prunable_targets(net, job.prune.include, job.prune.exclude, job.prune.blocks or loaded.block_pattern)
    return measure_rr(net, targets, stage_calibration(data.calibration), sparsity, shrinkage=shrinkage)


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def render_rr_markdown(rows: list[dict], title: str) -> str:
    lines = [f"# Relative Repairability — {title}", "", "RR = residual / raw distortion of the layer's own output after variance matching "
             "(0 = fully repairable; > 1 = the repair amplifies the damage).", "",
             "| layer | params | raw | residual | RR | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['layer']}` | {r['params']} | {_fmt(r['raw'])} | {_fmt(r['residual'])} | {_fmt(r['rr'])} | {r['status']} |")
    return "\n".join(lines) + "\n"


def plot_rr(rows: list[dict], path: Path, title: str) -> None:
    """One bar per layer; bars above the RR = 1 line (repair amplifies damage) in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [r["rr"] if r["rr"] is not None else 0.0 for r in rows]
    colors = ["tab:red" if (r["rr"] or 0) > 1 else ("tab:gray" if r["rr"] is None else "tab:blue") for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), values, color=colors)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["layer"].removesuffix(".weight") for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("RR = residual / raw")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_diagnosis(rows: list[dict], out: Path, title: str, force: bool = False) -> None:
    """rr.json, rr.md and rr.png, appearing together or not at all."""
    from starfish.common.outputs import atomic_output_dir

    with atomic_output_dir(out, force) as scratch:
        (scratch / "rr.json").write_text(json.dumps(rows, indent=2) + "\n")
        (scratch / "rr.md").write_text(render_rr_markdown(rows, title))
        plot_rr(rows, scratch / "rr.png", title)
