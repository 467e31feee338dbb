"""Joint vs block-wise healing on the shared ViT and ResNet-20: top-1, heal time and peak memory.

Protocol: per-layer uniform magnitude pruning at each sparsity, no repair (the published recipe,
``starfish run --repair none``); 200 calibration images drawn with seed 0 from ``train/``; STARFISH
healing at its defaults with three scopes: ``joint`` (one backward through the whole network),
``blockwise-sparse`` (each block alone, fed the healed network's own stream) and
``blockwise-dense`` (each block alone, fed the dense stream); top-1 on all 10,000 test images.

Every heal runs in a fresh subprocess that loads the model and calibration images, prunes, records
its peak RSS (``ru_maxrss``) just before healing, heals, records it again and saves the healed
weights; the increase is the memory healing itself added. The parent process decodes the test
set once per model and scores each healed model. ``--threads 1`` keeps it fair on a shared machine.

    python benchmarks/heal_scope.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from starfish.nn.device import current_memory_mb, peak_memory_mb, reset_peak_memory

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
MODELS = {
    "cifar10-vit": ("ViT", "vit_cifar10_smmk47.pth"),
    "cifar10-resnet20": ("ResNet-20", "resnet20_akamaster.th"),
}
SCOPES = {"joint": ("joint", "sparse"), "blockwise-sparse": ("blockwise", "sparse"), "blockwise-dense": ("blockwise", "dense")}


def _reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark and return the current RSS in MB."""
    reset_peak_memory(torch.device("cpu"))
    current = current_memory_mb(torch.device("cpu"))
    return current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss() -> float:
    return peak_memory_mb(torch.device("cpu"), since_reset=True)[0]


def heal_cell(spec: str, sparsity: float, scope: str, calib_size: int, seed: int, out: Path) -> None:
    """Child process: prune, heal with one scope, save the healed weights and the measurements."""
    from starfish.data.images import load_folder
    from starfish.heal import HealConfig, heal
    from starfish.models import create_model
    from starfish.pruning import PruneConfig, prune

    loaded = create_model(spec, SHARED / "models" / MODELS[spec][1])
    calib = load_folder(SHARED / "data/cifar10/train", loaded.preprocess.transform(), calib_size, seed, "calibration", balanced=False, progress=False)[0]
    dense = loaded.module
    sparse = copy.deepcopy(dense)
    masks = prune(sparse, PruneConfig(sparsity=sparsity))
    kind, inputs = SCOPES[scope]
    before = _reset_peak_rss()
    result = heal(dense, sparse, masks, calib, HealConfig(seed=seed, device="cpu", progress=False, scope=kind, blockwise_inputs=inputs), block_pattern=loaded.block_pattern)
    after = _peak_rss()
    assert masks.violations(sparse) == {}, "mask contract broken"
    torch.save(sparse.state_dict(), out / "healed.pt")
    need = result.memory_estimate["need_mb"] if result.memory_estimate else {}
    (out / "cell.json").write_text(json.dumps({
        "heal_seconds": result.seconds, "steps": result.steps, "rss_before_heal_mb": before, "rss_peak_during_heal_mb": after,
        "heal_rss_increase_mb": after - before, "estimate_mb": need, "diverged": result.diverged,
        "achieved_sparsity": masks.sparsity(), "loss_first": result.loss_history[0], "loss_last": result.loss_history[-1],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cifar10-resnet20,cifar10-vit")
    parser.add_argument("--sparsities", default="0.5,0.75,0.9")
    parser.add_argument("--scopes", default=",".join(SCOPES))
    parser.add_argument("--calib-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=None, help="default: all 10,000 test images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "heal_scope.json"))
    parser.add_argument("--md", default=str(REPO / "benchmarks" / "HEAL_SCOPE.md"))
    parser.add_argument("--render", nargs="+", metavar="JSON", help="only merge these results files into --json and --md")
    parser.add_argument("--run-command", action="append", default=[], help="with --render: a command that made the results")
    parser.add_argument("--cell", nargs=3, metavar=("MODEL", "SPARSITY", "SCOPE"), help=argparse.SUPPRESS)
    parser.add_argument("--cell-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cell:
        heal_cell(args.cell[0], float(args.cell[1]), args.cell[2], args.calib_size, args.seed, Path(args.cell_out))
        return
    if args.render:  # results of several runs (e.g. one per model, run side by side) in one table
        cells: dict[tuple, dict] = {}
        for path in args.render:  # the first file that has a cell wins
            for row in json.loads(Path(path).read_text()):
                cells.setdefault((row["model"], row["sparsity"], row["scope"]), row)
        rows = sorted(cells.values(), key=lambda r: (r["model"] != "cifar10-resnet20", r["sparsity"], list(SCOPES).index(r["scope"])))
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        write_markdown(rows, args, args.run_command)
        return

    from starfish.data.images import load_folder
    from starfish.tasks.evaluate import predict, top1
    from starfish.models import create_model
    from starfish.pruning import PruneConfig, prune

    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for spec in args.models.split(","):
        loaded = create_model(spec, SHARED / "models" / MODELS[spec][1])
        evalset, _, _ = load_folder(SHARED / "data/cifar10/test", loaded.preprocess.transform(), args.eval_size, 0, "eval", balanced=True, progress=False)
        dense = loaded.module
        dense_acc = top1(predict(dense, evalset, device="cpu"))
        for sparsity in [float(x) for x in args.sparsities.split(",")]:
            pruned = copy.deepcopy(dense)
            prune(pruned, PruneConfig(sparsity=sparsity))
            pruned_acc = top1(predict(pruned, evalset, device="cpu"))
            for scope in args.scopes.split(","):
                with tempfile.TemporaryDirectory(prefix="heal-scope-") as tmp:
                    cmd = [sys.executable, __file__, "--cell", spec, str(sparsity), scope, "--cell-out", tmp,
                           "--calib-size", str(args.calib_size), "--seed", str(args.seed), "--threads", str(args.threads)]
                    subprocess.run(cmd, check=True, env=env)
                    cell = json.loads((Path(tmp) / "cell.json").read_text())
                    healed = copy.deepcopy(dense)
                    healed.load_state_dict(torch.load(Path(tmp) / "healed.pt"))
                healed_acc = top1(predict(healed, evalset, device="cpu"))
                rows.append({"model": spec, "sparsity": sparsity, "scope": scope, "dense": dense_acc, "pruned": pruned_acc, "healed": healed_acc, **cell})
                print(f"{spec} s={sparsity} {scope}: pruned {pruned_acc:.4f} healed {healed_acc:.4f} ({cell['heal_seconds']:.1f} s, "
                      f"heal RSS +{cell['heal_rss_increase_mb']:.0f} MB, peak {cell['rss_peak_during_heal_mb']:.0f} MB)", flush=True)
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")  # partial results survive an interruption
                write_markdown(rows, args)


def write_markdown(rows: list[dict], args: argparse.Namespace, commands: list[str] | None = None) -> None:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        "# Joint vs block-wise healing",
        "",
        "Commands (from the repository root, with `../shared` beside it):",
        "",
        "```",
        *(commands or ["OMP_NUM_THREADS=1 python " + " ".join(["benchmarks/heal_scope.py"] + sys.argv[1:])]),
        "```",
        "",
        f"Protocol: per-layer uniform magnitude pruning, no repair (`--repair none`); {args.calib_size} calibration "
        f"images drawn with seed {args.seed} from `train/` (labels unused); STARFISH healing at its defaults (Adam, "
        "lr 6e-4 cosine to 1e-6 per step, batch 32, 10 epochs, BatchNorm in train mode, float16 target cache). "
        "*joint* = the published recipe (`--heal-scope joint`: one backward through the whole network per step); "
        "*blockwise-sparse* / *blockwise-dense* = `--heal-scope blockwise --blockwise-inputs sparse|dense`: each block "
        "trained alone with the same per-block budget (10 epochs over the calibration set) against the dense block's "
        f"output. Top-1 on {'all 10,000' if args.eval_size is None else args.eval_size} test images. CPU only, "
        f"{args.threads} torch thread, torch {torch.__version__}, on a shared, busy 2-core machine: times are indicative only.",
        "",
        "Memory: each heal runs in a fresh process; the kernel's peak-RSS mark is reset just before healing (Linux "
        "`/proc/self/clear_refs` 5, model, calibration images and pruning already loaded); *heal RSS increase* = the "
        "peak resident set during healing (`VmHWM`) minus the resident set just before it, i.e. what healing itself "
        "added; *process peak RSS* = that peak, torch and the models included; *plan* = starfish's own estimate made before healing (weights, gradients, optimizer "
        "state, targets, measured activations), the figure it refuses a run on.",
        "",
        "| model | sparsity | dense | pruned | scope | healed | heal time | heal RSS increase | process peak RSS (during heal) | plan |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plan = sum(r["estimate_mb"].values())
        lines.append(
            f"| {MODELS[r['model']][0]} | {pct(r['sparsity'])} | {pct(r['dense'])} | {pct(r['pruned'])} | {r['scope']} | "
            f"{pct(r['healed'])}{' (diverged)' if r['diverged'] else ''} | {r['heal_seconds']:.1f} s | "
            f"{r['heal_rss_increase_mb']:.0f} MB | {r['rss_peak_during_heal_mb']:.0f} MB | {plan:.0f} MB |"
        )
    lines += ["", "Per-cell results: `benchmarks/results/heal_scope.json`.", ""]
    out = Path(args.md)
    marker = "## Reading"  # a written reading below the table survives a re-render
    kept = out.read_text()[out.read_text().index(marker):] if out.exists() and marker in out.read_text() else ""
    out.write_text("\n".join(lines) + ("\n" + kept if kept else ""))


if __name__ == "__main__":
    main()
