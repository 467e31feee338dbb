"""Rerun the reference table of ../shared/README.md with starfish and write BENCHMARKS.md.

Protocol (the published STARFISH recipe at its defaults): per-layer uniform magnitude pruning of
every prunable block weight; 200 calibration images drawn with the seed from ``train/``; STARFISH
healing (Adam, lr 6e-4 -> 1e-6 cosine per step, batch 32, 10 epochs, per-block 1 - cosine);
top-1 on all 10,000 test images. Each seed draws a different calibration set; pruning is
deterministic, so the "pruned" column does not depend on the seed. A second column heals the
same pruned weights the way ``starfish run`` does by default (``--repair auto``: variance
matching first where it is chosen, see ``starfish.repair.resolve_repair``). Every cell runs through
the public API: one ``starfish.experiments.compare.compare`` grid per (network, seed), so pruning, repairs,
healing and scoring are the very steps ``starfish run`` and ``starfish compare`` take. (With
--eval-size below 10,000, each seed also draws its own class-balanced evaluation subset.)

    python benchmarks/reference_table.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from starfish.experiments.compare import compare
from starfish.heal import HealConfig
from starfish.repair import resolve_repair
from starfish.experiments.run_config import RunConfig
from starfish.experiments.steps import build_model

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
MODELS = {
    "cifar10-vit": ("ViT", "vit_cifar10_smmk47.pth"),
    "cifar10-resnet20": ("ResNet-20", "resnet20_akamaster.th"),
}
# The reference column of ../shared/README.md (STARFISH recipe, and pruned without healing).
REFERENCE = {
    ("cifar10-vit", 0.5): (59.2, 70.0), ("cifar10-vit", 0.75): (24.8, 55.7), ("cifar10-vit", 0.9): (11.9, 13.6),
    ("cifar10-resnet20", 0.5): (78.0, 80.7), ("cifar10-resnet20", 0.75): (40.9, 72.7), ("cifar10-resnet20", 0.9): (16.0, 31.2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cifar10-vit,cifar10-resnet20")
    parser.add_argument("--sparsities", default="0.5,0.75,0.9")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--calib-size", type=int, default=200)
    parser.add_argument("--eval-size", type=int, default=None, help="default: all 10,000 test images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--merge", action="store_true", help="keep rows of other models from the last results file")
    parser.add_argument("--bn-mode", default=HealConfig().bn_mode, choices=["train", "frozen"], help="BatchNorm while healing")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "reference_table.json"), help="per-seed results file")
    parser.add_argument("--no-markdown", action="store_true", help="write only --json (e.g. for the frozen-BatchNorm comparison)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    sparsities = [float(x) for x in args.sparsities.split(",")]
    rows = []
    for spec in args.models.split(","):
        cells: dict[tuple[float, str], list[dict]] = {}  # (sparsity, healer) -> one row per seed
        protocol: dict = {}
        repair = "none"
        for seed in seeds:
            config = RunConfig(
                model=spec, weights=str(SHARED / "models" / MODELS[spec][1]), calib=str(SHARED / "data/cifar10/train"),
                calib_size=args.calib_size, eval=str(SHARED / "data/cifar10/test"), eval_size=args.eval_size, seed=seed,
                heal=HealConfig(device="cpu", progress=False, bn_mode=args.bn_mode),
            )
            repair, _ = resolve_repair("auto", build_model(config).module, True, args.bn_mode)
            healers = ["none", "starfish"] + ([f"{repair}+starfish"] if repair != "none" else [])  # default pipeline too
            result = compare(config, sparsities, healers)
            protocol = result["protocol"]
            for row in result["rows"]:
                assert row["mask_violations"] == 0
                cells.setdefault((row["sparsity"], row["healer"]), []).append(row)
                print(f"{spec} s={row['sparsity']} seed={seed} {row['healer']}: top-1 {row['top1']:.4f} ({row['heal_seconds']:.1f} s)", flush=True)
        default = f"{repair}+starfish" if repair != "none" else "starfish"
        for sparsity in sparsities:
            recipe = cells[(sparsity, "starfish")]
            rows.append({"bn_mode": args.bn_mode,
                "model": spec, "sparsity": sparsity, "achieved_sparsity": recipe[0]["achieved_sparsity"], "dense": protocol["dense_top1"],
                "pruned": cells[(sparsity, "none")][0]["top1"], "healed": [r["top1"] for r in recipe], "seeds": seeds,
                "heal_seconds": [r["heal_seconds"] for r in recipe], "peak_memory_mb": max(r["peak_memory_mb"] for r in recipe),
                "default_repair": repair, "healed_default_pipeline": [r["top1"] for r in cells[(sparsity, default)]],
            })
    results = Path(args.json)
    if args.merge and results.exists():  # keep earlier rows of models not rerun now
        rerun = {r["model"] for r in rows}
        rows = [r for r in json.loads(results.read_text()) if r["model"] not in rerun] + rows
        rows.sort(key=lambda r: (list(MODELS).index(r["model"]), r["sparsity"]))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(rows, indent=2) + "\n")
    if not args.no_markdown:
        write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    out = Path(args.out)
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        "# Benchmarks",
        "",
        "## The reference table of `../shared/README.md`, rerun with starfish",
        "",
        "Command (from the repository root, with `../shared` beside it):",
        "",
        "```",
        "python " + " ".join(["benchmarks/reference_table.py"] + sys.argv[1:]),
        "```",
        "",
        f"Protocol: per-layer uniform magnitude pruning of every prunable block weight (ViT: attention in/out "
        f"projections and both MLP layers of all 6 layers; ResNet-20: every 3x3 conv in the 9 residual blocks); "
        f"{args.calib_size} calibration images drawn uniformly from `train/` with each seed (labels unused); STARFISH "
        f"healing at its defaults (Adam, lr 6e-4 cosine-decayed per step to 1e-6, batch 32, 10 epochs, mean over "
        f"blocks of per-block 1 - cosine, masks re-applied after every step, BatchNorm in train mode so its "
        f"statistics follow the sparse network while its affine parameters stay frozen, dropout off); top-1 on "
        f"{'all 10,000' if args.eval_size is None else args.eval_size} test images. Seeds {args.seeds} "
        f"draw different calibration sets; pruning is deterministic. CPU only ({os.cpu_count()} cores, "
        f"{args.threads} torch threads, torch {torch.__version__}); heal times are medians over the seeds of one run "
        f"and are noisy on this shared machine. Peak memory is the benchmark process's peak RSS.",
        "",
        "Columns: *recipe* = the published STARFISH recipe from the pruned weights (`starfish run --repair none`); "
        "*default pipeline* = what `starfish run` does with no flags (`--repair auto`, which adds variance matching "
        "before healing on the ViT and nothing on ResNet-20, whose BatchNorms re-normalise while healing).",
        "",
        "| model | sparsity | dense | pruned | recipe, seed 0 | recipe, mean ± sd | reference recipe | of dense (mean) | default pipeline, mean ± sd | of dense (mean) | heal time (median) | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref_pruned, ref_healed = REFERENCE.get((r["model"], r["sparsity"]), (None, None))
        mean = statistics.mean(r["healed"])
        sd = statistics.stdev(r["healed"]) if len(r["healed"]) > 1 else 0.0
        default = r["healed_default_pipeline"]
        dmean = statistics.mean(default)
        dsd = statistics.stdev(default) if len(default) > 1 else 0.0
        lines.append(
            f"| {MODELS[r['model']][0]} | {pct(r['sparsity'])} | {pct(r['dense'])} | {pct(r['pruned'])} "
            f"(ref {ref_pruned}%) | {pct(r['healed'][0])} | {pct(mean)} ± {100 * sd:.1f} | {ref_healed}% | "
            f"{pct(mean / r['dense'])} | {pct(dmean)} ± {100 * dsd:.1f} ({r['default_repair']} + starfish) | {pct(dmean / r['dense'])} | "
            f"{statistics.median(r['heal_seconds']):.1f} s | {r['peak_memory_mb']:.0f} MB |"
        )
    lines.append("")
    lines.append("Per-seed healed accuracies are in `benchmarks/results/reference_table.json`.")
    text = "\n".join(lines) + "\n"
    marker = "## The reference table"
    if out.exists() and marker in out.read_text():  # keep other sections of BENCHMARKS.md
        old = out.read_text()
        start = old.index(marker)
        end = old.find("\n## ", start + len(marker))
        section = text[text.index(marker):]
        text = old[:start] + section.rstrip("\n") + ("\n" + old[end:] if end != -1 else "\n")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)


if __name__ == "__main__":
    main()
