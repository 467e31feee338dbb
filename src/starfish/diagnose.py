"""``starfish diagnose``: Relative Repairability of every prunable layer, as a table and a chart.

For each layer alone: prune it at ``--sparsity`` (magnitude), measure its output distortion on
unlabeled calibration images, apply variance matching, measure again; RR = residual / raw.
Writes ``rr.json`` (a list of {layer, params, raw, residual, rr, status}), ``rr.md`` and ``rr.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from starfish.errors import StarfishError


def diagnose(
    model: str,
    weights: str | None,
    calib: str,
    calib_size: float | None,
    sparsity: float,
    shrinkage: float = 0.0,
    seed: int = 0,
    include: str | None = None,
    exclude: str | None = None,
    blocks: str | None = None,
    device: str = "auto",
) -> list[dict]:
    """RR rows for every prunable layer of ``model`` (see ``starfish.repair.relative``)."""
    from starfish.data import images_only, load_folder
    from starfish.device import resolve_device
    from starfish.models import create_model
    from starfish.repair.relative import measure_rr
    from starfish.structure import prunable_targets

    if not (0.0 < sparsity < 1.0):
        raise StarfishError(f"--sparsity must be in (0, 1) for a diagnosis; got {sparsity}.")
    loaded = create_model(model, weights)
    data, _, _ = load_folder(calib, loaded.preprocess.transform(), calib_size, seed, "calibration", balanced=False)
    net = loaded.module.to(resolve_device(device)).eval()
    targets = prunable_targets(net, include, exclude, blocks or loaded.block_pattern)
    return measure_rr(net, targets, images_only(data), sparsity, shrinkage=shrinkage)


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
    from starfish.outputs import atomic_output_dir

    with atomic_output_dir(out, force) as scratch:
        (scratch / "rr.json").write_text(json.dumps(rows, indent=2) + "\n")
        (scratch / "rr.md").write_text(render_rr_markdown(rows, title))
        plot_rr(rows, scratch / "rr.png", title)


def setup_parser(parser: argparse.ArgumentParser) -> None:
    from starfish.cli import device_arg, non_negative_float, regex_arg, seed_arg, size_arg

    parser.add_argument("--model", required=True, help="built-in name, timm:<name>, torchvision:<name> or package.module:factory")
    parser.add_argument("--weights", help="state dict (.pth/.pt/.th) or .safetensors")
    parser.add_argument("--calib", required=True, help="folder of unlabeled calibration images")
    parser.add_argument("--calib-size", type=size_arg, default=None, help="number of calibration images (default all)")
    parser.add_argument("--sparsity", type=float, required=True, help="sparsity each layer is pruned to, alone")
    parser.add_argument("--shrinkage", type=non_negative_float, default=0.0, help="variance-matching shrinkage (0 = plain matching)")
    parser.add_argument("--seed", type=seed_arg, default=0)
    parser.add_argument("--include", type=regex_arg, help="regex over parameter names: diagnose these weights instead of the block defaults")
    parser.add_argument("--exclude", type=regex_arg, help="regex over parameter names: skip these")
    parser.add_argument("--blocks", type=regex_arg, help="regex over module names that marks the blocks")
    parser.add_argument("--device", type=device_arg, default="auto")
    parser.add_argument("--out", required=True, help="output folder for rr.json, rr.md, rr.png (refused if it exists unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")


def cmd_diagnose(args: argparse.Namespace) -> int:
    from starfish.outputs import check_output_dir

    check_output_dir(args.out, args.force, (args.weights, args.calib))  # before any work
    size = args.calib_size
    if size is not None and size >= 1:
        size = int(size)
    rows = diagnose(args.model, args.weights, args.calib, size, args.sparsity, args.shrinkage, args.seed, args.include, args.exclude, args.blocks, args.device)
    title = f"{args.model} at {args.sparsity:g} sparsity per layer, {size or 'all'} calibration images"
    out = Path(args.out)
    write_diagnosis(rows, out, title, args.force)
    worst = max((r for r in rows if r["rr"] is not None), key=lambda r: r["rr"], default=None)
    amplified = sum(1 for r in rows if r["rr"] is not None and r["rr"] > 1)
    print(render_rr_markdown(rows, title))
    if worst:
        print(f"least repairable: {worst['layer']} (RR {worst['rr']:.3f}); {amplified} layer(s) where the repair amplifies damage")
    print(f"wrote {out}/ (rr.json, rr.md, rr.png)")
    return 0
