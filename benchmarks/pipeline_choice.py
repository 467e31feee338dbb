"""Does the label-free probe of ``--pipeline auto`` rank pipelines as test labels do?

Part 1 (``--groups``): for every (network, sparsity) group of the sweep in
``benchmarks/results/sweep/*.json`` that has 10-epoch STARFISH cells (heal ``starfish``), each
cell's pruner / allocation / repair is probed exactly as ``--pipeline auto`` probes a candidate
(``starfish.experiments.pipeline_choice.probe``: prune the dense model, repair, heal ``--probe-epochs`` epochs,
best held-out objective and the output KL(dense ‖ sparse) on 200 unlabeled ``train/`` images outside
the 200-image calibration draw, seed 0). The probe's ranking is compared with the ranking of the cells' test top-1 (Spearman), and
the pick of the probe (over the whole group, and over the greedy search ``--pipeline auto`` runs)
is compared with the best cell. The probe never sees a label or a test image; the sweep's top-1 was
measured once, before this script, with test labels.

Part 2 (``--runs``): ``starfish run --pipeline auto`` end to end (every default otherwise) on the
shared networks, top-1 on all 10,000 test images, next to the default pipeline.

    OMP_NUM_THREADS=1 python benchmarks/pipeline_choice.py --groups vit:0.75,vit:0.9,resnet20:0.9
    OMP_NUM_THREADS=1 python benchmarks/pipeline_choice.py --runs vit:0.9,resnet20:0.9
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
SWEEP = REPO / "benchmarks" / "results" / "sweep"
NETS = {
    "vit": ("cifar10-vit", "vit_cifar10_smmk47.pth", "vit.json", "ViT"),
    "resnet20": ("cifar10-resnet20", "resnet20_akamaster.th", "resnet20.json", "ResNet-20"),
    "resnet56": ("cifar10-resnet56", "resnet56_akamaster.th", "resnet56.json", "ResNet-56"),
}


def default_pipeline_top1() -> dict[tuple[str, float], str]:
    """Top-1 of `starfish run` at its defaults (--pipeline fixed), seed 0, all test images, as measured
    by benchmarks/time_to_accuracy.py (its "defaults" rows), keyed by (net, sparsity)."""
    path = REPO / "benchmarks" / "results" / "time_to_accuracy.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    return {(r["net"], r["sparsity"]): f"{r['final_top1']:.2%}" for r in rows if r["pipeline"] == "defaults"}


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def base_config(net: str, sparsity: float, probe_epochs: int, **changes):
    from starfish.heal import HealConfig
    from starfish.pruning import PruneConfig
    from starfish.experiments.run_config import RUN_BUDGET, RunConfig

    spec, weights, _, _ = NETS[net]
    return RunConfig(
        model=spec, weights=str(SHARED / "models" / weights), calib=str(SHARED / "data/cifar10/train"), calib_size=200,
        seed=0, prune=PruneConfig(sparsity=sparsity), probe_epochs=probe_epochs,
        heal=HealConfig(budget=RUN_BUDGET, device="cpu", progress=False), **changes,
    )


def greedy_pick(cells: list[dict]) -> dict:
    """The cell ``--pipeline auto``'s search (``greedy_search``) would finish, given every cell's probe
    signal, with the uniform allocation first as in its default candidate lists."""
    from starfish.experiments.pipeline_choice import Candidate, greedy_search

    by_candidate = {Candidate(c["pruner"], c["allocation"], c["repair"]): c for c in cells}
    allocations = list(dict.fromkeys(c["allocation"] for c in cells))
    lists = {
        "pruner": list(dict.fromkeys(c["pruner"] for c in cells)),
        "allocation": sorted(allocations, key=lambda a: a != "uniform"),
        "repair": list(dict.fromkeys(c["repair"] for c in cells)),
    }
    measured = greedy_search(lists, lambda candidate: by_candidate[candidate]["signal"])
    return min((by_candidate[c] for c in measured), key=lambda c: c["signal"])


def probe_group(net: str, sparsity: float, probe_epochs: int) -> dict:
    from starfish.experiments.pipeline_choice import Candidate, probe, resolve_probe_signal
    from starfish.experiments.steps import build_model, load_data

    sweep = json.loads((SWEEP / NETS[net][2]).read_text())
    cells = [c for c in sweep["cells"] if c["heal"] == "starfish" and abs(c["sparsity"] - sparsity) < 1e-9]
    if not cells:
        raise SystemExit(f"no 10-epoch starfish cells for {net} at {sparsity} in {SWEEP / NETS[net][2]}")
    config = base_config(net, sparsity, probe_epochs)
    loaded = build_model(config)
    data = load_data(config, loaded, evaluation=False)
    rank_by, _ = resolve_probe_signal(config.probe_signal, loaded.module)
    rows = []
    for cell in cells:
        candidate = Candidate(cell["pruner"], cell["allocation"], cell["repair"])
        result = probe(config, loaded, data, candidate)
        rows.append({**candidate.to_dict(), "signal": result.signal(rank_by), "objective": result.objective, "kl": result.kl,
                     "start": result.start, "probe_seconds": result.seconds, "top1": cell["top1"], "test_kl": cell.get("kl")})
        print(json.dumps(rows[-1]), flush=True)
    return score_group({"net": net, "sparsity": sparsity, "cells": rows, "n": len(rows), "probe_epochs": probe_epochs,
                        "eval_images": sweep.get("eval_images"), "probe_seconds": sum(r["probe_seconds"] for r in rows)}, rank_by)


def score_group(group: dict, rank_by: str) -> dict:
    """Rank a group's probed cells by ``rank_by`` ("kl" or "objective"): correlations and picks."""
    rows = group["cells"]
    for r in rows:
        r["signal"] = r["kl"] if rank_by == "kl" and r["kl"] is not None else r["objective"]
    top1 = [r["top1"] for r in rows]
    return {
        **group, "rank_by": rank_by,
        "spearman_probe": spearman([-r["signal"] for r in rows], top1),
        "spearman_kl": spearman([-r["kl"] for r in rows], top1),
        "spearman_objective": spearman([-r["objective"] for r in rows], top1),
        "spearman_start": spearman([-r["start"] for r in rows], top1),
        "spearman_test_kl": spearman([-r["test_kl"] for r in rows], top1) if all(r["test_kl"] is not None for r in rows) else None,
        "best": max(rows, key=lambda r: r["top1"]), "pick": min(rows, key=lambda r: r["signal"]), "greedy": greedy_pick(rows),
        "pick_by_kl": min(rows, key=lambda r: r["kl"]), "pick_by_objective": min(rows, key=lambda r: r["objective"]),
    }


def rescore(groups: list[dict]) -> list[dict]:
    """Apply the current ``--probe-signal auto`` rule to groups probed earlier (no new probe)."""
    from starfish.models import create_model
    from starfish.experiments.pipeline_choice import resolve_probe_signal

    out = []
    for g in groups:
        spec, weights, _, _ = NETS[g["net"]]
        rank_by, _ = resolve_probe_signal("auto", create_model(spec, SHARED / "models" / weights).module)
        out.append(score_group(g, rank_by))
    return out


def run_auto(net: str, sparsity: float, probe_epochs: int, eval_size: int | None) -> dict:
    from starfish.experiments.run import run

    config = base_config(net, sparsity, probe_epochs, pipeline="auto", eval=str(SHARED / "data/cifar10/test"), eval_size=eval_size)
    started = time.perf_counter()
    report = run(config)
    return {
        "net": net, "sparsity": sparsity, "top1": report["top1"], "pipeline": report["pipeline"],
        "heal_seconds": report["heal_seconds"], "run_seconds": time.perf_counter() - started,
        "epochs_used": (report["heal"].get("steps") or 0) / -(-report["calibration"]["size"] // report["heal"]["batch_size"]),
        "achieved_sparsity": report["sparsity"], "eval_images": report["eval"]["size"],
    }


def cell(c: dict) -> str:
    return f"{c['pruner']} / {c['allocation']} / {c['repair']}"


def render(groups: list[dict], runs: list[dict], commands: list[str]) -> str:
    lines = ["# Label-free pipeline choice (`--pipeline auto`)", "", "Commands:", "", "```", *commands, "```", "",
             "Protocol: " + " ".join(__doc__.split("Part 1 (``--groups``): ", 1)[1].split("\n\n")[0].split()).replace("``", "`"), ""]
    if groups:
        lines += [
            "Spearman correlation with the cells' test top-1 of: the probe's held-out output KL(dense ‖ sparse), its best held-out "
            "healing objective (per-block 1 - cosine), the objective before the short heal, and, for reference, the fully healed "
            "cell's own KL on the test images (no labels, but the test images). `--probe-signal auto` ranks by the column *ranked by* "
            "(the objective for networks with BatchNorm, else the KL; that rule was read off these same groups, so it is not an "
            "independent test of itself). Picks: the cell each signal would choose (test top-1 in brackets); the greedy search is "
            "the one `--pipeline auto` runs (every pruner x repair at uniform, then the other allocations).", "",
            "| network | sparsity | cells | ranked by (auto) | Spearman: probe KL | probe objective | objective before healing | "
            "final KL on test images | best cell (test top-1) | pick of the rule, all cells | greedy search's pick | "
            "pick by probe KL | pick by probe objective | probe time (all cells) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in groups:
            kl = f"{g['spearman_test_kl']:.2f}" if g["spearman_test_kl"] is not None else "—"
            lines.append(
                f"| {NETS[g['net']][3]} | {g['sparsity']:.0%} | {g['n']} | {g['rank_by']} | {g['spearman_kl']:.2f} | {g['spearman_objective']:.2f} | "
                f"{g['spearman_start']:.2f} | {kl} | {cell(g['best'])} ({g['best']['top1']:.1%}) | {cell(g['pick'])} ({g['pick']['top1']:.1%}) | "
                f"{cell(g['greedy'])} ({g['greedy']['top1']:.1%}) | {cell(g['pick_by_kl'])} ({g['pick_by_kl']['top1']:.1%}) | "
                f"{cell(g['pick_by_objective'])} ({g['pick_by_objective']['top1']:.1%}) | {g['probe_seconds']:.0f} s |"
            )
        lines.append("")
    if runs:
        defaults = default_pipeline_top1()
        lines += ["`starfish run --pipeline auto` end to end (all other settings at their defaults; top-1 on "
                  f"{runs[0]['eval_images']} test images):", "",
                  "| network | sparsity | chosen | probes | probing time | heal time, epochs | top-1 (dense, pruned, healed) | default pipeline |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            t, p = r["top1"], r["pipeline"]
            lines.append(
                f"| {NETS[r['net']][3]} | {r['sparsity']:.0%} | {cell(p['chosen'])} | {len(p['candidates'])} | {p['seconds']:.0f} s | "
                f"{r['heal_seconds']:.0f} s, {r['epochs_used']:.0f} | {t['dense']:.2%}, {t['pruned']:.2%}, {t['healed']:.2%} | "
                f"{defaults.get((r['net'], r['sparsity']), '—')} |"
            )
        lines += ["", "*default pipeline*: `--pipeline fixed` (magnitude, uniform, repair auto) with every other default, seed 0, "
                  "all 10,000 test images, from `benchmarks/results/time_to_accuracy.json`.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="", help="net:sparsity,... probed against the sweep cells")
    parser.add_argument("--runs", default="", help="net:sparsity,... run end to end with --pipeline auto")
    parser.add_argument("--probe-epochs", type=int, default=3)
    parser.add_argument("--rescore", action="store_true", help="re-rank the probed groups in --json with the current rule")
    parser.add_argument("--eval-size", type=int, default=None, help="end-to-end runs: test images (default all)")
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/pipeline_choice.json"))
    parser.add_argument("--md", default=str(REPO / "benchmarks/PIPELINE_CHOICE.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = Path(args.json)
    saved = json.loads(path.read_text()) if path.exists() else {"groups": [], "runs": [], "commands": []}
    command = "OMP_NUM_THREADS=1 python benchmarks/pipeline_choice.py " + " ".join(sys.argv[1:])
    if command not in saved["commands"]:
        saved["commands"].append(command)
    if args.rescore:
        saved["groups"] = rescore(saved["groups"])
        path.write_text(json.dumps(saved, indent=1) + "\n")
    for spec in filter(None, args.groups.split(",")):
        net, sparsity = spec.split(":")
        saved["groups"].append(probe_group(net, float(sparsity), args.probe_epochs))
        path.write_text(json.dumps(saved, indent=1) + "\n")
    for spec in filter(None, args.runs.split(",")):
        net, sparsity = spec.split(":")
        saved["runs"].append(run_auto(net, float(sparsity), args.probe_epochs, args.eval_size))
        print(json.dumps({k: v for k, v in saved["runs"][-1].items() if k != "pipeline"}), flush=True)
        path.write_text(json.dumps(saved, indent=1) + "\n")
    text = render(saved["groups"], saved["runs"], saved["commands"])
    Path(args.md).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
