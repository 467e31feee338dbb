"""PNG plots for reports: accuracy vs sparsity, per-block alignment, healing loss curves.

Figures are built with matplotlib's object API on the Agg canvas, so nothing here touches the
global pyplot backend of a user's session and everything works headless.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

# Fixed colours so a healer looks the same in every plot of every report.
COLORS = {
    "none": "#7f7f7f",
    "starfish": "#d62728",
    "kd": "#1f77b4",
    "nmse": "#2ca02c",
    "finetune": "#9467bd",
    "bn": "#ff7f0e",
    "varmatch": "#8c564b",
}
_EXTRA = ["#17becf", "#bcbd22", "#e377c2", "#393b79", "#637939"]


# Distinct markers, and wide translucent lines under thin ones for the reference series, so a
# healer that lands exactly on another (e.g. bn on a network without BatchNorm) stays visible.
MARKERS = {"none": "s", "starfish": "o", "kd": "^", "nmse": "D", "finetune": "v", "bn": "P", "varmatch": "X"}
WIDE = ("none", "starfish")


def style_of(healer: str, uses_labels: bool = False, markers: bool = True) -> dict:
    """A healer's line style. ``REPAIR+HEALER`` shares HEALER's colour and marker, drawn dash-dotted
    with hollow markers, so "with and without the repair" reads as a pair."""
    wide = healer in WIDE
    after_repair = "+" in healer and healer not in COLORS
    style = {
        "color": color_of(healer),
        "linewidth": 4.0 if wide else 1.5,
        "alpha": 0.75 if wide else 1.0,
        "zorder": 2 if wide else 3,
        "linestyle": "--" if uses_labels else "-." if after_repair else "-",
    }
    if markers:
        style.update(marker=MARKERS.get(healer.split("+")[-1], "o"), markersize=8 if wide else 5)
        if after_repair:
            style.update(markerfacecolor="white", markeredgewidth=1.5, markersize=7)
    return style


def color_of(healer: str) -> str:
    if healer in COLORS:
        return COLORS[healer]
    last = healer.split("+")[-1]
    if last in COLORS and "+" in healer:
        return COLORS[last]
    return _EXTRA[sum(map(ord, healer)) % len(_EXTRA)]


def label_of(healer: str, uses_labels: bool = False) -> str:
    """Legend text; anything trained with labels says so, since that is not a like-for-like comparison."""
    names = {"none": "prune only (none)"}
    text = names.get(healer, healer)
    return f"{text} (uses labels)" if uses_labels else text


def _figure(panels: int, width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels + 2.4, height), dpi=100, layout="constrained")  # + the legend
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def draw_each(jobs: Sequence[tuple[str, Callable[[Path], object]]], folder: Path) -> list[str]:
    """Draw every (file name, drawer) into ``folder``; returns the names drawn. A plot that fails
    is a warning on stderr, never a failed run: the numbers matter more than the pictures."""
    made: list[str] = []
    for name, draw in jobs:
        try:
            draw(folder / name)
            made.append(name)
        except Exception as exc:  # noqa: BLE001
            print(f"starfish: warning: could not draw {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return made


def _legend(fig, axes) -> None:
    """One legend for the whole figure, outside the panels so no line is hidden under it."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside right upper", fontsize=8)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def accuracy_vs_sparsity(
    rows: Sequence[Mapping],
    dense_top1: float | None,
    path: str | Path,
    title: str,
    metric: str = "top1",
) -> Path:
    """Top-1 (or ``metric``, e.g. perplexity on a log axis) against sparsity, one line per healer
    (one panel per allocation), dense as a dashed line."""
    top1 = metric == "top1"
    scale = 100.0 if top1 else 1.0
    allocations = sorted({str(r.get("allocation", "")) for r in rows})
    fig, axes = _figure(len(allocations))
    for ax, allocation in zip(axes, allocations):
        mine = [r for r in rows if str(r.get("allocation", "")) == allocation and r.get(metric) is not None]
        healers = list(dict.fromkeys(r["healer"] for r in mine))
        for healer in healers:
            pts = sorted((r["sparsity"], r[metric]) for r in mine if r["healer"] == healer)
            uses = any(r.get("uses_labels") for r in mine if r["healer"] == healer)
            ax.plot(
                [100 * s for s, _ in pts],
                [scale * a for _, a in pts],
                **style_of(healer, uses),
                label=label_of(healer, uses),
            )
        if dense_top1 is not None:
            shown = f"{100 * dense_top1:.1f}%" if top1 else f"{dense_top1:.2f}"
            ax.axhline(scale * dense_top1, color="black", linestyle=":", linewidth=1.5, label=f"dense ({shown})")
        sparsities = sorted({100 * r["sparsity"] for r in mine})
        ax.set_xticks(sparsities)
        ax.set_xlabel("sparsity of the prunable weights (%)")
        if top1:
            ax.set_ylabel("top-1 accuracy (%)")
            ax.set_ylim(0, 100)
        else:
            ax.set_ylabel(f"{metric} (lower is better)")
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_title(f"{title}" + (f" — {allocation} allocation" if allocation and len(allocations) > 1 else ""))
    _legend(fig, axes)
    return _save(fig, path)


def block_alignment(
    panels: Sequence[tuple[str, Mapping[str, Mapping[str, float]]]],
    path: str | Path,
    uses_labels: Mapping[str, bool] | None = None,
) -> Path:
    """Per-block mean cosine with the dense model; each panel maps a series label to {block: cosine}.

    A series whose label ends in ``before healing`` is drawn dashed black: the shared starting point.
    """
    uses_labels = uses_labels or {}
    fig, axes = _figure(len(panels), width=5.6)
    lowest = 1.0
    for ax, (title, series) in zip(axes, panels):
        blocks: list[str] = []
        for name, values in series.items():
            blocks = list(values)
            ys = [values[b] for b in blocks]
            lowest = min(lowest, *ys) if ys else lowest
            if name.endswith("before healing"):
                ax.plot(range(len(blocks)), ys, color="black", linestyle="--", marker="x", label=name)
            else:
                ax.plot(
                    range(len(blocks)),
                    ys,
                    **style_of(name, uses_labels.get(name, False)),
                    label=label_of(name, uses_labels.get(name, False)),
                )
        ax.set_xticks(range(len(blocks)))
        ax.set_xticklabels(blocks, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("block (forward order)")
        ax.set_ylabel("mean cosine with the dense block output")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    for ax in axes:
        ax.set_ylim(max(-1.0, min(0.0, lowest) if lowest < 0 else lowest - 0.05), 1.01)
    return _save(fig, path)


def loss_curves(
    panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]],
    path: str | Path,
    relative: bool,
    uses_labels: Mapping[str, bool] | None = None,
) -> Path:
    """Healing loss per optimizer step. ``relative`` divides each curve by its first value, so that
    objectives measured in different units (cosine, KL, cross-entropy, NMSE) share one axis."""
    uses_labels = uses_labels or {}
    fig, axes = _figure(len(panels), width=5.6)
    for ax, (title, curves) in zip(axes, panels):
        for name, losses in curves.items():
            if not losses:
                continue
            ys = [v / losses[0] for v in losses] if relative and losses[0] > 0 else list(losses)
            ax.plot(
                range(1, len(ys) + 1),
                ys,
                **{**style_of(name, uses_labels.get(name, False), markers=False), "linewidth": 2.5 if name in WIDE else 1.2},
                label=label_of(name, uses_labels.get(name, False)),
            )
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss / loss at step 1 (log)" if relative else "healing loss (log)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    _legend(fig, axes)
    return _save(fig, path)


def held_out_curve(title: str, stopping: Mapping[str, object], path: str | Path) -> Path:
    """Budget auto: the held-out healing objective and KL(dense ‖ sparse) per evaluation, the kept
    point marked; one axis each (different units), epochs on x."""
    curve = list(stopping["curve"])  # type: ignore[arg-type]
    epochs = [p["epoch"] for p in curve]
    fig, axes = _figure(2, width=5.0)
    for ax, key, name in zip(axes, ("objective", "kl"), ("held-out healing objective", "held-out KL(dense ‖ sparse)")):
        ys = [p[key] for p in curve]
        if any(y is None for y in ys):
            ax.set_visible(False)
            continue
        ax.plot(epochs, ys, marker="o", markersize=3, linewidth=1.2, color="#1f77b4", label=name)
        best = stopping.get("best_epoch")
        if best is not None:
            ax.axvline(float(best), color="#d62728", linestyle=":", linewidth=1.2, label="kept weights")  # type: ignore[arg-type]
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name + " (log)")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    _legend(fig, axes)
    return _save(fig, path)
