"""1 vs 2 processes (``--distributed ddp``, gloo on CPU): time per healing step and peak memory per rank.

Protocol: ResNet-20 and the ViT on CIFAR-10, magnitude 75%, STARFISH joint healing, the SAME global
batch in both settings (``--batch-size``, split across the ranks), calibration images drawn with
seed 0, one thread per process. Each rank times every optimizer step (from one step's loss call to
the next: forward, backward, gradient all-reduce, optimizer step and mask) and reports the median,
and its own peak resident set size. One torchrun launch per cell; ratios are quoted from one run.

    OMP_NUM_THREADS=1 python benchmarks/distributed.py --calib-size 256 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
MODELS = {
    "cifar10-resnet20": SHARED / "models" / "resnet20_akamaster.th",
    "cifar10-vit": SHARED / "models" / "vit_cifar10_smmk47.pth",
}
OUT = REPO / "benchmarks" / "DISTRIBUTED.md"


def worker(args: argparse.Namespace) -> None:
    """One rank: build, prune, heal with timed steps; write this rank's numbers."""
    import importlib

    import torch

    heal_steps = importlib.import_module("starfish.heal.training")  # starfish.heal is also a function name
    from starfish import HealConfig, PruneConfig, RunConfig
    from starfish.distributed import current
    from starfish.experiments.launch import launched
    from starfish.distributed.ddp import data_parallel_step
    from starfish.experiments.steps import build_model, heal_step, load_data, prune_step

    torch.set_num_threads(1)
    stamps: list[float] = []

    def timed_step(loss_of, params):
        step = data_parallel_step(loss_of, params)
        inner = step.loss

        def loss(index):
            stamps.append(time.perf_counter())
            return inner(index)

        step.loss = loss
        return step

    heal_steps.data_parallel_step = timed_step  # the benchmark's only hook: a timestamp per step
    heal = HealConfig(healer="starfish", seed=0, progress=False, device="cpu", epochs=args.epochs, batch_size=args.batch_size)
    config = RunConfig(
        model=args.model, weights=str(MODELS[args.model]), calib=str(SHARED / "data" / "cifar10" / "train"),
        calib_size=args.calib_size, seed=0, prune=PruneConfig(sparsity=0.75), heal=heal, repair="none",
    )
    with launched("ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None, config):
        loaded = build_model(config)
        data = load_data(config, loaded, evaluation=False)
        sparse, masks, _, _ = prune_step(config, loaded.module, data.calibration)
        started = time.perf_counter()
        result = heal_step(loaded.module, sparse, masks, data.calibration, config.heal, loaded.block_pattern, config.seed)
        seconds = time.perf_counter() - started
        rank = current().rank if current() is not None else 0
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    record = {
        "rank": rank, "steps": result.steps, "median_step_s": statistics.median(steps) if steps else None,
        "heal_s": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss_last": result.loss_history[-1] if result.loss_history else None,
    }
    Path(args.results, f"rank{rank}.json").write_text(json.dumps(record))


def launch(model: str, nproc: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as results:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__, "--worker",
            "--model", model, "--results", results, "--calib-size", str(args.calib_size),
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
        subprocess.run(command, check=True, env=env, cwd=REPO)
        return [json.loads(p.read_text()) for p in sorted(Path(results).glob("rank*.json"))]


def render(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# One vs two processes (`--distributed ddp`, gloo, CPU)",
        "",
        f"Produced by `OMP_NUM_THREADS=1 python benchmarks/distributed.py --calib-size {args.calib_size} "
        f"--batch-size {args.batch_size} --epochs {args.epochs}` on {time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        "Magnitude 75%, STARFISH joint healing, the same global batch in both settings (split across the",
        "ranks), one thread per process. **Timings were taken on a shared, busy 2-core CPU machine** (other",
        "jobs ran at the same time, load average well above 2): read them as an illustration of the",
        "overheads, not as a speed-up measurement. Peak memory is each rank's peak resident set size",
        "(the whole process: Python, torch, the model, the cached dense targets and the calibration set).",
        "",
        "| model | processes | rank | steps | median s / step | heal s | peak RSS MB | last loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['nproc']} | {row['rank']} | {row['steps']} | {row['median_step_s']:.3f} | "
            f"{row['heal_s']:.1f} | {row['peak_rss_mb']:.0f} | {row['loss_last']:.4f} |"
        )
    lines += ["", "Ratios (two processes / one process, rank 0, same run):", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        one = next(r for r in rows if r["model"] == model and r["nproc"] == 1)
        two = next(r for r in rows if r["model"] == model and r["nproc"] == 2 and r["rank"] == 0)
        lines.append(
            f"- {model}: time per step x{two['median_step_s'] / one['median_step_s']:.2f}, "
            f"peak RSS per rank x{two['peak_rss_mb'] / one['peak_rss_mb']:.2f}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None)
    parser.add_argument("--models", default="cifar10-resnet20,cifar10-vit")
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for model in args.models.split(","):
        for nproc in (1, 2):
            rows += [{"model": model, "nproc": nproc, **r} for r in launch(model, nproc, args)]
    OUT.write_text(render(rows, args))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
