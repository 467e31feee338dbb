"""Sweep: sparsity x allocation x label-free repair x healing on the CIFAR ResNets, pruners on the ViT.

Writes benchmarks/results/sweep/<network>.json (every finished cell, rewritten after each one so a
cut-off run still leaves a table), benchmarks/SWEEP.md (tables, command, protocol) and PNG plots
under benchmarks/results/. Re-running the same command resumes: finished cells are skipped. One
results file per network, so networks can run in parallel processes (one thread each):

    python benchmarks/sweep_allocation.py --nets ResNet-20,ViT &
    python benchmarks/sweep_allocation.py --nets ResNet-56

Every cell runs through the public API: one ``starfish.experiments.compare.compare`` grid per pruning and heal
budget, so pruning, repairs, healing and scoring are the steps ``starfish run`` takes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from starfish.experiments.compare import compare
from starfish.heal import HealConfig
from starfish.pruning import PruneConfig
from starfish.experiments.run_config import RunConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
WEIGHTS = {
    "cifar10-resnet20": SHARED / "models" / "resnet20_akamaster.th",
    "cifar10-resnet56": SHARED / "models" / "resnet56_akamaster.th",
    "cifar10-vit": SHARED / "models" / "vit_cifar10_smmk47.pth",
}
SHORT = {"cifar10-resnet20": "ResNet-20", "cifar10-resnet56": "ResNet-56", "cifar10-vit": "ViT"}
ALLOCATIONS = ["uniform", "global", "erk", "lamp", "rr"]
RESNET_REPAIRS = ["none", "bn", "varmatch"]
RESNET_SPARSITIES = (0.90, 0.93, 0.95, 0.96)
VIT_PRUNERS = ["magnitude", "wanda", "sparsegpt"]
# "starfish": the published recipe (HealConfig defaults). "starfish-long": the same loss with a
# longer, hotter schedule, used only for the "best pipeline" rows; "kd-long": logit distillation
# (label-free) on the same schedule, as the control for the ViT's best rows.
HEALS = {"starfish": {}, "starfish-long": {"epochs": 60, "lr": 2e-3}, "kd-long": {"healer": "kd", "epochs": 60, "lr": 2e-3}}


def jobs(args) -> list[dict]:
    """Every pruning to run, most important first (a cut-off run keeps the most useful cells)."""
    out: list[dict] = []

    def resnet(net: str, s: float) -> None:
        for a in ALLOCATIONS:
            out.append({"net": net, "sparsity": s, "pruner": "magnitude", "allocation": a, "repairs": RESNET_REPAIRS, "heals": ["none", "starfish"]})

    def vit(s: float) -> None:
        for p in VIT_PRUNERS:
            out.append({"net": "cifar10-vit", "sparsity": s, "pruner": p, "allocation": "uniform", "repairs": ["none", "varmatch"], "heals": ["none", "starfish"]})

    def best(net: str, spec: str, heals: list[str]) -> None:
        pruner, allocation, repair = spec.split(":")
        out.append({"net": net, "sparsity": 0.90, "pruner": pruner, "allocation": allocation, "repairs": [repair], "heals": heals, "best": True})

    for s in RESNET_SPARSITIES:
        resnet("cifar10-resnet20", s)
    for spec in filter(None, args.r20_best.split(",")):
        best("cifar10-resnet20", spec, ["starfish-long"])
    for s in (0.90, 0.75):
        vit(s)
    for spec in filter(None, args.vit_best.split(",")):
        best("cifar10-vit", spec, ["starfish-long", "kd-long"])
    for s in RESNET_SPARSITIES:
        resnet("cifar10-resnet56", s)
    return [j for j in out if SHORT[j["net"]] in args.nets]


def cell_key(c: dict) -> str:
    return f"{c['net']}|{c['sparsity']}|{c['pruner']}|{c['allocation']}|{c['repair']}|{c['heal']}"


def run_config(net: str, args, pruner: str = "magnitude", heal: str = "starfish") -> RunConfig:
    """The job of one network: seed-0 calibration and evaluation images, one pruner, one heal budget."""
    size = args.r56_eval_size if net == "cifar10-resnet56" else args.eval_size
    return RunConfig(
        model=net, weights=str(WEIGHTS[net]), calib=str(SHARED / "data/cifar10/train"), calib_size=args.calib_size,
        eval=str(SHARED / "data/cifar10/test"), eval_size=size, seed=0, prune=PruneConfig(pruner=pruner),
        heal=HealConfig(progress=False, device="cpu", **HEALS.get(heal, {})), eval_batch_size=500,
    )


def healer_name(repair: str, heal: str) -> str:
    """The compare healer for a (repair, heal) cell, e.g. varmatch + starfish-long -> varmatch+starfish."""
    objective = None if heal == "none" else HEALS[heal].get("healer", "starfish")
    if repair == "none":
        return objective or "none"
    return f"{repair}+{objective}" if objective else repair


class Store:
    """One JSON file of cells per network; the tables are rendered from all of them."""

    def __init__(self, folder: Path, fresh: bool) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, dict] = {}
        for net in SHORT:
            path = self.path(net)
            if path.exists() and not fresh:
                self.data[net] = json.loads(path.read_text())

    def path(self, net: str) -> Path:
        return self.folder / f"{SHORT[net].lower().replace('-', '')}.json"

    def of(self, net: str) -> dict:
        return self.data.setdefault(net, {"cells": [], "layer_sparsity": {}, "rr": {}, "dense_top1": None, "eval_images": None})

    def reload_others(self, mine: list[str]) -> None:
        """Pick up what parallel processes wrote for the networks this one does not run."""
        for net in SHORT:
            if net not in mine and self.path(net).exists():
                self.data[net] = json.loads(self.path(net).read_text())

    def save(self, net: str, command: str) -> None:
        results = self.of(net)
        results["command"] = command
        tmp = self.path(net).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(self.path(net))

    def cells(self) -> list[dict]:
        return [c for net in SHORT for c in self.data.get(net, {}).get("cells", [])]


def run_job(job: dict, args, store: Store, save) -> None:
    net = job["net"]
    results = store.of(net)
    done = {cell_key(c) for c in results["cells"]}
    keys = {(r, h): cell_key({**job, "repair": r, "heal": h}) for r in job["repairs"] for h in job["heals"]}
    budgets: dict[str, list[tuple[str, str]]] = {}  # one compare grid per heal budget; "none" rides along
    for (r, h), key in keys.items():
        if key not in done:
            budgets.setdefault("starfish" if h == "none" else h, []).append((r, h))
    for budget, cells in budgets.items():
        config = run_config(net, args, job["pruner"], budget)
        names = {healer_name(r, h): (r, h) for r, h in cells}
        layers: dict = {}
        result = compare(config, [job["sparsity"]], list(names), [job["allocation"]],
                         inspect=lambda stage, row, model, masks: layers.update(masks.layer_sparsity()))
        if results["dense_top1"] is None:
            results["dense_top1"] = result["protocol"]["dense_top1"]
            results["eval_images"] = result["protocol"]["eval"]["size"]
            print(f"{SHORT[net]} dense top-1 {100 * results['dense_top1']:.2f}% on {results['eval_images']} images", flush=True)
        results["layer_sparsity"][f"{job['sparsity']}|{job['pruner']}|{job['allocation']}"] = layers
        rr = result["curves"][0].get("relative_repairability")
        if rr:
            results["rr"][str(job["sparsity"])] = rr
        for row in result["rows"]:
            repair, h = names[row["healer"]]
            cell = {
                "net": net, "sparsity": job["sparsity"], "pruner": job["pruner"], "allocation": job["allocation"],
                "repair": repair, "heal": h, "top1": row["top1"], "agreement": row["agreement"], "kl": row["kl"],
                "achieved_sparsity": row["achieved_sparsity"], "prune_seconds": row["prune_seconds"],
                "repair_and_heal_seconds": row["heal_seconds"], "heal_steps": row["steps"],
                "heal_config": asdict(config.heal) if h != "none" else None, "eval_images": result["protocol"]["eval"]["size"],
                "best": bool(job.get("best")),
            }
            results["cells"].append(cell)
            print(f"{SHORT[net]:9s} {100 * job['sparsity']:.0f}% {job['pruner']:9s} {job['allocation']:7s} {repair:8s} {h:13s} "
                  f"top-1 {100 * row['top1']:.2f}%  (prune {row['prune_seconds']:.0f}s, repair + heal {row['heal_seconds']:.0f}s)", flush=True)
            save(net)


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def render(store: Store, args) -> str:
    cells = {cell_key(c): c for c in store.cells()}
    dense = {net: d["dense_top1"] for net, d in store.data.items() if d.get("dense_top1") is not None}
    images = {net: d.get("eval_images") for net, d in store.data.items()}
    commands = sorted({d["command"] for d in store.data.values() if d.get("command")})
    eval_text = ", ".join(f"{SHORT[n]} {'all 10,000' if images.get(n) == 10000 else images.get(n)} images" for n in SHORT if images.get(n))
    lines = ["# Sweep: allocation × label-free repair × healing (and pruners on the ViT)", "",
             "Generated by `benchmarks/sweep_allocation.py`; every number below was produced by that script on the "
             "shared CIFAR-10 material. A cell shows top-1 in % ('—' = not run).", "",
             "Commands (the networks ran in parallel processes, one thread each):", "", "```", *commands, "```", "", "## Protocol", "",
             f"- Calibration: {args.calib_size} unlabeled images from `shared/data/cifar10/train`, drawn with seed 0 "
             "(the same images for pruning statistics, repairs, RR and healing).",
             f"- Evaluation (class-balanced, seed 0, from the 10,000-image test split): {eval_text}.",
             "- Pruned weights: every conv inside the residual blocks (ResNets), every attention/MLP weight inside the "
             "encoder layers (ViT); stem, embedding and head stay dense. Sparsity is global over those weights and met exactly.",
             "- ResNets: magnitude pruner; allocations uniform / global (one magnitude threshold) / erk / lamp / rr "
             "(LAMP scores scaled by each layer's Relative Repairability, measured on the calibration images at the target sparsity).",
             "- ViT: per-layer uniform sparsity, pruners magnitude / wanda / sparsegpt (damping 0.01, block 128, healing "
             "starts from SparseGPT's reconstructed weights); BatchNorm recalibration does not apply (no BatchNorm).",
             "- Repairs: `bn` = BatchNorm recalibration on the calibration images; `varmatch` = channelwise variance "
             "matching (plain, no shrinkage) folded into biases / re-based BatchNorms.",
             "- Heal `starfish` = the published recipe at starfish's defaults (per-block 1−cosine, Adam lr 6e-4 → 1e-6 cosine, "
             "batch 32, 10 epochs = 70 steps, only surviving prunable weights train, BatchNorm in train mode with frozen affine). "
             "Best-pipeline rows only: `starfish-long` = same loss, 60 epochs, lr 2e-3; "
             "`kd-long` = KL(dense ‖ sparse) on logits (label-free), same schedule. Each cell's full heal config is in its JSON.",
             f"- One seed (0); CPU, torch {torch.__version__}, {platform.platform()}.", ""]
    for net in ("cifar10-resnet20", "cifar10-resnet56"):
        if net not in dense:
            continue
        lines += [f"## {SHORT[net]} (dense {pct(dense[net])}%), repair / heal", "",
                  "| sparsity | allocation | " + " | ".join(f"{r} / {h}" for r in RESNET_REPAIRS for h in ("none", "starfish")) + " |",
                  "|---|---|" + "---|" * 6]
        for s in RESNET_SPARSITIES:
            for a in ALLOCATIONS:
                row = [pct(cells.get(f"{net}|{s}|magnitude|{a}|{r}|{h}", {}).get("top1")) for r in RESNET_REPAIRS for h in ("none", "starfish")]
                lines.append(f"| {100 * s:.0f}% | {a} | " + " | ".join(row) + " |")
        lines.append("")
    if "cifar10-vit" in dense:
        lines += [f"## ViT (dense {pct(dense['cifar10-vit'])}%), uniform per-layer sparsity, repair / heal", "",
                  "| sparsity | pruner | none / none | none / starfish | varmatch / none | varmatch / starfish |", "|---|---|---|---|---|---|"]
        for s in (0.75, 0.90):
            for p in VIT_PRUNERS:
                row = [pct(cells.get(f"cifar10-vit|{s}|{p}|uniform|{r}|{h}", {}).get("top1")) for r in ("none", "varmatch") for h in ("none", "starfish")]
                lines.append(f"| {100 * s:.0f}% | {p} | " + " | ".join(row) + " |")
        lines.append("")
    lines += derived(store)
    best = [c for c in store.cells() if c.get("best")]
    if best:
        lines += ["## Best pipelines found (longer heal)", "", "| model | sparsity | pruner | allocation | repair | heal | top-1 | agreement with dense |", "|---|---|---|---|---|---|---|---|"]
        for c in best:
            lines.append(f"| {SHORT[c['net']]} | {100 * c['sparsity']:.0f}% | {c['pruner']} | {c['allocation']} | {c['repair']} | {c['heal']} | {pct(c['top1'])} | {pct(c['agreement'])} |")
        lines.append("")
    lines += ["Plots: `benchmarks/results/sweep_resnet20.png`, `sweep_resnet56.png`, `sweep_vit.png` (top-1 vs sparsity per allocation "
              "or pruner, one panel per repair × heal, dotted line = dense).", ""]
    return "\n".join(lines)


def derived(store: Store) -> list[str]:
    """Summary figures the written reading quotes, computed here from the cells (not by hand)."""
    lines = ["## Derived from the cells above (ResNets)", ""]
    for net in ("cifar10-resnet20", "cifar10-resnet56"):
        data = store.data.get(net)
        if not data:
            continue
        c = {(x["sparsity"], x["allocation"], x["repair"], x["heal"]): x["top1"] for x in data["cells"] if not x.get("best")}
        grid = [(s, a) for s in RESNET_SPARSITIES for a in ALLOCATIONS]
        if not all((s, a, r, h) in c for s, a in grid for r in RESNET_REPAIRS for h in ("none", "starfish")):
            continue
        pts = lambda d: f"{100 * d:+.1f}"  # noqa: E731
        vm_bn = [c[(s, a, "varmatch", "none")] - c[(s, a, "bn", "none")] for s, a in grid]
        vm_heal = [c[(s, a, "varmatch", "starfish")] - c[(s, a, "none", "starfish")] for s, a in grid]
        bn_heal = [c[(s, a, "bn", "starfish")] - c[(s, a, "none", "starfish")] for s, a in grid]
        best_free = [max(c[(s, a, r, "none")] for a in ALLOCATIONS for r in RESNET_REPAIRS) for s in RESNET_SPARSITIES]
        best_healed = [max(c[(s, a, r, "starfish")] for a in ALLOCATIONS for r in RESNET_REPAIRS) for s in RESNET_SPARSITIES]
        over_uniform = [c[(s, a, "none", "starfish")] - c[(s, "uniform", "none", "starfish")] for s in (0.90, 0.93) for a in ("global", "erk", "lamp")]
        sparsities = " / ".join(f"{100 * s:.0f}" for s in RESNET_SPARSITIES)
        lines += [
            f"**{SHORT[net]}** (points; {len(grid)} sparsity × allocation cells)",
            "",
            f"- best cell without healing at {sparsities}%: " + " / ".join(pct(v) for v in best_free) + "%; best healed: " + " / ".join(pct(v) for v in best_healed) + "%",
            f"- varmatch minus bn, no healing: varmatch ahead in {sum(d > 0 for d in vm_bn)} of {len(grid)} cells, range {pts(min(vm_bn))} to {pts(max(vm_bn))}",
            f"- varmatch / starfish minus none / starfish: mean {pts(sum(vm_heal) / len(vm_heal))}, range {pts(min(vm_heal))} to {pts(max(vm_heal))}",
            f"- bn / starfish minus none / starfish: largest difference {pts(max(bn_heal, key=abs))}",
            f"- healed global / erk / lamp minus uniform at 90–93%: {pts(min(over_uniform))} to {pts(max(over_uniform))}",
        ]
        rr = [r["rr"] for rows in data.get("rr", {}).values() for r in rows if r["rr"] is not None]
        if rr:
            lines.append(f"- RR of single layers at {sparsities}%: {min(rr):.2f} to {max(rr):.2f}; {sum(v > 1 for v in rr)} above 1")
        layers = data.get("layer_sparsity", {})
        lamp, by_rr = layers.get("0.9|magnitude|lamp"), layers.get("0.9|magnitude|rr")
        if lamp and by_rr:
            moves = sorted(lamp, key=lambda k: abs(by_rr[k] - lamp[k]), reverse=True)[:3]
            lines.append("- largest per-layer moves, LAMP → RR allocation at 90%: " + ", ".join(
                f"`{k.removesuffix('.weight')}` {pct(lamp[k])} → {pct(by_rr[k])}%" for k in moves))
        lines.append("")
    return lines if len(lines) > 2 else []


def plot(store: Store, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = store.cells()
    for net in ("cifar10-resnet20", "cifar10-resnet56"):
        mine = [c for c in cells if c["net"] == net and not c.get("best")]
        if not mine:
            continue
        fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharey=True)
        for j, r in enumerate(RESNET_REPAIRS):
            for i, h in enumerate(("none", "starfish")):
                ax = axes[i][j]
                for a in ALLOCATIONS:
                    pts = sorted((c["sparsity"], c["top1"]) for c in mine if c["allocation"] == a and c["repair"] == r and c["heal"] == h)
                    if pts:
                        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=a)
                ax.axhline(100 * store.of(net)["dense_top1"], color="k", ls=":", lw=0.8)
                ax.axhline(10, color="gray", ls="--", lw=0.6)
                ax.set_title(f"repair {r}, heal {h}", fontsize=9)
                ax.set_xlabel("global sparsity (%)")
                ax.grid(alpha=0.3)
        for row in axes:
            row[0].set_ylabel("top-1 (%)")
        axes[0][0].legend(fontsize=8, title="allocation", title_fontsize=8)
        fig.suptitle(f"{SHORT[net]}: top-1 vs sparsity per allocation (dotted: dense, dashed: chance)")
        fig.tight_layout()
        fig.savefig(out / f"sweep_{SHORT[net].lower().replace('-', '')}.png", dpi=110)
        plt.close(fig)
    vit = [c for c in cells if c["net"] == "cifar10-vit" and not c.get("best")]
    if vit:
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.8), sharey=True)
        for k, (r, h) in enumerate([(r, h) for r in ("none", "varmatch") for h in ("none", "starfish")]):
            ax = axes[k]
            for p in VIT_PRUNERS:
                pts = sorted((c["sparsity"], c["top1"]) for c in vit if c["pruner"] == p and c["repair"] == r and c["heal"] == h)
                if pts:
                    ax.plot([100 * q[0] for q in pts], [100 * q[1] for q in pts], marker="o", label=p)
            ax.axhline(100 * store.of("cifar10-vit")["dense_top1"], color="k", ls=":", lw=0.8)
            ax.set_title(f"repair {r}, heal {h}", fontsize=9)
            ax.set_xlabel("sparsity (%)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("top-1 (%)")
        axes[0].legend(fontsize=8, title="pruner", title_fontsize=8)
        fig.suptitle("ViT: top-1 vs sparsity per pruner (dotted: dense)")
        fig.tight_layout()
        fig.savefig(out / "sweep_vit.png", dpi=110)
        plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calib-size", type=int, default=200)
    parser.add_argument("--r56-eval-size", type=int, default=2000, help="ResNet-56 test subset (default 2000; time budget)")
    parser.add_argument("--nets", default="ResNet-20,ViT,ResNet-56", help="comma-separated subset of ResNet-20, ResNet-56, ViT")
    parser.add_argument("--r20-best", default="magnitude:lamp:varmatch,magnitude:lamp:none,magnitude:global:none",
                        help="pruner:allocation:repair triples healed with the long schedule on ResNet-20 at 90%%")
    parser.add_argument("--vit-best", default="wanda:uniform:varmatch,sparsegpt:uniform:varmatch",
                        help="pruner:allocation:repair triples healed with the long schedules on the ViT at 90%%")
    parser.add_argument("--eval-size", type=int, default=None, help="smoke tests only: evaluate on a subset (default: all 10,000)")
    parser.add_argument("--max-jobs", type=int, default=None, help="smoke tests only: stop after this many prunings")
    parser.add_argument("--out", default=str(REPO / "benchmarks"), help="folder for SWEEP.md; results/ goes inside it")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results instead of resuming")
    args = parser.parse_args()
    args.nets = [n.strip() for n in args.nets.split(",")]
    torch.set_num_threads(args.threads)
    command = "python benchmarks/sweep_allocation.py " + " ".join(sys.argv[1:])
    results_dir = Path(args.out) / "results"
    store = Store(results_dir / "sweep", args.fresh)
    md = Path(args.out) / "SWEEP.md"
    mine = [n for n in SHORT if SHORT[n] in args.nets]

    def render_all() -> None:
        store.reload_others(mine)
        reading = ""
        if md.exists() and "<!-- reading -->" in md.read_text():
            reading = md.read_text().split("<!-- reading -->", 1)[1]
        tmp = md.with_suffix(".tmp")
        tmp.write_text(render(store, args) + "\n<!-- reading -->" + reading)
        tmp.replace(md)
        plot(store, results_dir)

    def save(net: str) -> None:
        """New cells for ``net``: its results file records them with the command that made them."""
        store.save(net, command)
        render_all()

    for n, job in enumerate(jobs(args)):
        if args.max_jobs is not None and n >= args.max_jobs:
            break
        run_job(job, args, store, save)
    render_all()  # tables and plots from every results file; a run with nothing left to do only re-renders
    print(f"done: {len(store.cells())} cells in {store.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
