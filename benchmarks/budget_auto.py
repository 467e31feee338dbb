"""Label-free stopping (``--budget auto``) against the published fixed 10-epoch budget.

Protocol: the default pipeline of ``starfish run`` (magnitude pruning, uniform allocation, repair
auto, STARFISH healing) on the shared CIFAR-10 networks, 200 calibration images drawn with seed 0
from ``train/``; ``auto`` holds out 200 further unlabeled images of ``train/`` (disjoint from the
calibration draw) and stops on their plateau, ``fixed`` trains the published 10 epochs. Top-1 on the
test split (all 10,000 images unless ``--eval-size``). Each cell calls ``starfish.run`` in this
process and is appended to the JSON file as soon as it finishes, so cells can run in parallel
processes (one thread each) and an interrupted sweep keeps what it measured.

    OMP_NUM_THREADS=1 python benchmarks/budget_auto.py --cells vit:0.75 --budgets auto,fixed
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
MODELS = {
    "vit": ("cifar10-vit", "vit_cifar10_smmk47.pth"),
    "resnet20": ("cifar10-resnet20", "resnet20_akamaster.th"),
}


def cell_config(net: str, sparsity: float, budget: str, eval_size: int | None, seed: int, heal: dict):
    from starfish.heal import HealConfig
    from starfish.pruning import PruneConfig
    from starfish.experiments.run_config import RunConfig

    spec, weights = MODELS[net]
    heal_config = HealConfig(budget=budget, device="cpu", progress=False, **heal)
    return RunConfig(
        model=spec, weights=str(SHARED / "models" / weights), calib=str(SHARED / "data/cifar10/train"), calib_size=200,
        eval=str(SHARED / "data/cifar10/test"), eval_size=eval_size, seed=seed, prune=PruneConfig(sparsity=sparsity), heal=heal_config,
    )


def run_cell(net: str, sparsity: float, budget: str, eval_size: int | None, seed: int, heal: dict) -> dict:
    from starfish.experiments.run import run

    started = time.perf_counter()
    report = run(cell_config(net, sparsity, budget, eval_size, seed, heal))
    h = report["heal"]
    steps_per_epoch = -(-report["calibration"]["size"] // h["batch_size"])
    return {
        "net": net, "sparsity": sparsity, "budget": budget, "seed": seed, "heal_overrides": heal,
        "eval_size": report["eval"]["size"], "top1": report["top1"], "repair": report.get("repair"),
        "heal_seconds": report["heal_seconds"], "steps": h.get("steps"), "epochs_used": (h.get("steps") or 0) / steps_per_epoch,
        "stopping": h.get("stopping"), "run_seconds": time.perf_counter() - started,
        "achieved_sparsity": report["sparsity"], "threads": torch.get_num_threads(),
    }


def append(path: Path, row: dict) -> None:
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(row)
    path.write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="vit:0.75,resnet20:0.75,resnet20:0.9", help="net:sparsity,...")
    parser.add_argument("--budgets", default="auto,fixed")
    parser.add_argument("--eval-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heal", default="{}", help="JSON of extra HealConfig fields, e.g. '{\"lr\": 0.002}'")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/budget_auto.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for cell in args.cells.split(","):
        net, sparsity = cell.split(":")
        for budget in args.budgets.split(","):
            row = run_cell(net, float(sparsity), budget, args.eval_size, args.seed, json.loads(args.heal))
            append(Path(args.out), row)
            print(json.dumps({k: row[k] for k in ("net", "sparsity", "budget", "top1", "heal_seconds", "epochs_used")}), flush=True)


if __name__ == "__main__":
    main()
