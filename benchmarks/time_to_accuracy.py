"""Time to accuracy: top-1 against healing wall time and optimizer steps, defaults vs the published recipe.

Protocol: the shared ViT and ResNet-20 pruned by per-layer uniform magnitude at each sparsity, 200
calibration images drawn with seed 0 from ``train/``. Two pipelines from the same pruned weights:
*recipe* = the published STARFISH recipe (``--repair none --budget fixed``: 10 epochs, batch 32,
lr 6e-4 cosine); *defaults* = ``starfish run`` with no tuning flag (repair auto, then ``--budget
auto``: held-out stopping on 200 further unlabeled ``train/`` images, up to 60 epochs). After every
epoch the live weights are scored on a class-balanced subset of the test split (``--curve-size``
images, decoded once); that scoring is paused out of the clock, so a point's time is the repair
plus the healing wall time up to it (held-out checks included, since the defaults pay for them).
The healed result (for the defaults, the weights kept by the held-out rule) is scored on all test
images at the end. Every pipeline runs in this one process, one torch thread, one after the other,
so the ratios are fair on a shared machine; absolute times are not.

The labels of the test images are read only to draw the curve and the final score; no choice of
either pipeline sees them.

    OMP_NUM_THREADS=1 python benchmarks/time_to_accuracy.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
MODELS = {
    "vit": ("cifar10-vit", "vit_cifar10_smmk47.pth", "ViT"),
    "resnet20": ("cifar10-resnet20", "resnet20_akamaster.th", "ResNet-20"),
}
PIPELINES = ("recipe", "defaults")


def run_config(net: str, sparsity: float, pipeline: str, eval_size: int | None):
    from starfish.heal import HealConfig
    from starfish.pruning import PruneConfig
    from starfish.experiments.run_config import RUN_BUDGET, RunConfig

    spec, weights, _ = MODELS[net]
    recipe = pipeline == "recipe"
    heal = HealConfig(budget="fixed" if recipe else RUN_BUDGET, device="cpu", progress=False)
    return RunConfig(
        model=spec, weights=str(SHARED / "models" / weights), calib=str(SHARED / "data/cifar10/train"), calib_size=200,
        eval=str(SHARED / "data/cifar10/test"), eval_size=eval_size, seed=0, prune=PruneConfig(sparsity=sparsity),
        repair="none" if recipe else "auto", heal=heal,
    )


def curve_scorer(size: int, transform):
    """Top-1 on a fixed, class-balanced test subset decoded once (``load_folder``), scored with
    ``predict`` (which leaves the model in eval mode; the observer restores the heal mode)."""
    from starfish.data.images import load_folder
    from starfish.tasks.evaluate import predict, top1

    subset, _, _ = load_folder(SHARED / "data/cifar10/test", transform, size, 0, "eval", balanced=True, progress=False)
    return lambda model: top1(predict(model, subset, batch_size=500, device="cpu"))


def run_pipeline(net: str, sparsity: float, pipeline: str, args: argparse.Namespace) -> dict:
    """Prune, repair and heal one pipeline, scoring the live weights after every epoch off the clock."""
    from starfish.heal.training import set_heal_mode
    from starfish.repair import resolve_repair
    from starfish.experiments.steps import build_model, evaluation, heal_step, load_data, prune_step, repair_step

    config = run_config(net, sparsity, pipeline, args.eval_size)
    loaded = build_model(config)
    data = load_data(config, loaded)
    score = curve_scorer(args.curve_size, loaded.preprocess.transform())
    dense = loaded.module
    sparse, masks, _, _ = prune_step(config, dense, data.calibration)
    repair, _ = resolve_repair(config.repair, sparse, True, config.heal.bn_mode, True)
    started = time.perf_counter()
    repair_step(repair, dense, sparse, masks, data.calibration)
    repair_seconds = time.perf_counter() - started
    steps_per_epoch = -(-data.calib_size // config.heal.batch_size)
    curve = [{"step": 0, "epoch": 0.0, "seconds": repair_seconds, "top1": score(sparse)}]
    paused = 0.0
    heal_started = 0.0

    def observe(step: int) -> None:
        nonlocal paused
        if step % steps_per_epoch:
            return
        stop = time.perf_counter()
        curve.append({"step": step, "epoch": step / steps_per_epoch,
                      "seconds": repair_seconds + stop - heal_started - paused, "top1": score(sparse)})
        set_heal_mode(sparse, config.heal)
        paused += time.perf_counter() - stop

    heal_started = time.perf_counter()
    result = heal_step(dense, sparse, masks, data.calibration, config.heal, loaded.block_pattern, config.seed,
                       held=data.held, observer=observe)
    heal_seconds = time.perf_counter() - heal_started - paused
    scoring = evaluation(config, data, loaded)
    scoring.score("healed", sparse)
    kept_subset = score(sparse)
    stopping = result.stopping or {}
    return {
        "net": net, "sparsity": sparsity, "pipeline": pipeline, "repair": repair, "budget": config.heal.budget,
        "repair_seconds": repair_seconds, "heal_seconds": heal_seconds, "total_seconds": repair_seconds + heal_seconds,
        "steps": result.steps, "steps_per_epoch": steps_per_epoch, "curve": curve,
        "final_top1": scoring.scores["healed"]["top1"], "final_subset_top1": kept_subset,
        "eval_images": data.eval_size, "curve_images": args.curve_size,
        "kept_epoch": stopping.get("best_epoch"), "stop_reason": stopping.get("reason"),
    }


def time_to_reach(curve: list[dict], target: float) -> dict | None:
    """The first curve point at or above ``target`` (top-1 on the curve subset), or None."""
    return next((p for p in curve if p["top1"] >= target), None)


def summarise(rows: list[dict]) -> list[dict]:
    """Per net and sparsity: when the defaults first reach the recipe's final subset accuracy."""
    out = []
    for net, sparsity in dict.fromkeys((r["net"], r["sparsity"]) for r in rows):
        cell = {r["pipeline"]: r for r in rows if r["net"] == net and r["sparsity"] == sparsity}
        if set(cell) != set(PIPELINES):
            continue
        recipe, defaults = cell["recipe"], cell["defaults"]
        target = recipe["final_subset_top1"]
        reached = time_to_reach(defaults["curve"], target)
        out.append({
            "net": net, "sparsity": sparsity, "recipe_final_subset": target,
            "recipe_seconds": recipe["total_seconds"], "recipe_steps": recipe["steps"],
            "defaults_reach_seconds": reached["seconds"] if reached else None,
            "defaults_reach_step": reached["step"] if reached else None,
            "ratio": reached["seconds"] / recipe["total_seconds"] if reached else None,
            "recipe_final": recipe["final_top1"], "defaults_final": defaults["final_top1"],
            "defaults_seconds": defaults["total_seconds"], "defaults_steps": defaults["steps"],
        })
    return out


def render(rows: list[dict], summary: list[dict], command: str) -> str:
    lines = [
        "# Time to accuracy: the defaults against the published recipe", "",
        f"Command: `{command}` (results: `benchmarks/results/time_to_accuracy.json`, plot: "
        "`benchmarks/time_to_accuracy.png`).", "",
        "Protocol: " + " ".join(__doc__.split("Protocol: ", 1)[1].split("\n\n")[0].split()).replace("``", "`"), "",
        f"CPU, 1 torch thread, torch {torch.__version__}; the curve subset is {rows[0]['curve_images']} class-balanced "
        f"test images, the final score uses {rows[0]['eval_images']}.", "",
        "| network | sparsity | recipe: final top-1 (all test) | recipe: time, steps | defaults: final top-1 (all test) "
        "| defaults: time, steps | defaults reach the recipe's final curve accuracy after | share of the recipe's time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        reach = (f"{s['defaults_reach_seconds']:.1f} s (step {s['defaults_reach_step']})"
                 if s["defaults_reach_seconds"] is not None else "never")
        ratio = f"{s['ratio']:.2f}" if s["ratio"] is not None else "—"
        lines.append(
            f"| {MODELS[s['net']][2]} | {s['sparsity']:.0%} | {s['recipe_final']:.2%} | {s['recipe_seconds']:.1f} s, "
            f"{s['recipe_steps']} | {s['defaults_final']:.2%} | {s['defaults_seconds']:.1f} s, {s['defaults_steps']} | "
            f"{reach} (curve target {s['recipe_final_subset']:.2%}) | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys((r["net"], r["sparsity"]) for r in rows))
    fig, axes = plt.subplots(2, len(cells), figsize=(4.2 * len(cells), 7), squeeze=False)
    for col, (net, sparsity) in enumerate(cells):
        for r in (r for r in rows if r["net"] == net and r["sparsity"] == sparsity):
            xs_t = [p["seconds"] for p in r["curve"]]
            xs_s = [p["step"] for p in r["curve"]]
            ys = [100 * p["top1"] for p in r["curve"]]
            label = f"{r['pipeline']} ({r['repair']}, budget {r['budget']})"
            axes[0][col].plot(xs_t, ys, marker=".", label=label)
            axes[1][col].plot(xs_s, ys, marker=".", label=label)
        axes[0][col].set_title(f"{MODELS[net][2]}, {sparsity:.0%}")
        axes[0][col].set_xlabel("repair + healing wall time (s, 1 thread)")
        axes[1][col].set_xlabel("optimizer steps")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_ylabel("top-1 on the curve subset (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="vit:0.75,vit:0.9,resnet20:0.75,resnet20:0.9", help="net:sparsity,...")
    parser.add_argument("--curve-size", type=int, default=2000, help="test images scored after every epoch")
    parser.add_argument("--eval-size", type=int, default=None, help="final score (default: all 10,000 test images)")
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/time_to_accuracy.json"))
    parser.add_argument("--md", default=str(REPO / "benchmarks/TIME_TO_ACCURACY.md"))
    parser.add_argument("--png", default=str(REPO / "benchmarks/time_to_accuracy.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict] = []
    for cell in args.cells.split(","):
        net, sparsity = cell.split(":")
        for pipeline in PIPELINES:
            rows.append(run_pipeline(net, float(sparsity), pipeline, args))
            r = rows[-1]
            print(json.dumps({k: r[k] for k in ("net", "sparsity", "pipeline", "final_top1", "total_seconds", "steps")}), flush=True)
            Path(args.json).write_text(json.dumps({"rows": rows, "summary": summarise(rows)}, indent=1) + "\n")
    command = "OMP_NUM_THREADS=1 python benchmarks/time_to_accuracy.py " + " ".join(sys.argv[1:])
    summary = summarise(rows)
    Path(args.json).write_text(json.dumps({"command": command, "rows": rows, "summary": summary}, indent=1) + "\n")
    Path(args.md).write_text(render(rows, summary, command.strip()))
    plot(rows, Path(args.png))
    print(render(rows, summary, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
