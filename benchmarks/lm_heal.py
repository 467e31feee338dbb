"""SmolLM2-135M on WikiText-2: prune, then heal, through the public API (the same steps as `starfish run`).

Protocol (issue: language models): perplexity on the first 6 non-overlapping windows of 2048
tokens of ../shared/data/wikitext2/test.txt; calibration 32 x 512 tokens drawn with seed 0 from
valid.tokenized.txt; embeddings and lm_head dense; every Linear in the decoder layers pruned.
Each cell is one `starfish.run` call; results are appended to the JSON after every cell, so a long
sweep keeps what finished, and the markdown table is rendered from the JSON.

    python scripts/install_smollm2.py
    OMP_NUM_THREADS=2 python benchmarks/lm_heal.py --cells wanda:none,wanda:starfish
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
MODEL = Path(os.environ.get("STARFISH_SMOLLM2", REPO / ".cache" / "smollm2-135m"))
RESULTS = REPO / "benchmarks" / "results" / "lm_heal.json"


def cell_config(pruner: str, healer: str, pattern: str | None, args: argparse.Namespace):
    from starfish import HealConfig, PruneConfig, RunConfig

    heal = HealConfig(healer=healer, seed=0, progress=False, device="cpu")
    if args.epochs is not None:
        heal.epochs = args.epochs
    if args.heal_scope:
        heal.scope = args.heal_scope
    if args.batch_size is not None:
        heal.batch_size = args.batch_size
    if args.lr is not None:
        heal.lr = args.lr
    return RunConfig(
        model=f"hf:{MODEL}",
        calib=str(SHARED / "data/wikitext2/valid.tokenized.txt"),
        calib_size=32,
        seq_len=512,
        eval=str(SHARED / "data/wikitext2/test.txt"),
        eval_size=6,
        eval_seq_len=2048,
        seed=0,
        prune=PruneConfig(sparsity=0.5, pruner=pruner, pattern=pattern),
        heal=heal,
    )


def render(rows: list[dict]) -> str:
    lines = [
        "| pruner | pattern | healer | scope | dense | pruned | healed | heal time | heal steps | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = r["perplexity"]
        healed = "—" if r["healer"] == "none" else f"{ppl['healed']:.2f}"
        lines.append(
            f"| {r['pruner']} | {r['pattern'] or '50% unstructured'} | {r['healer']} | {r['scope']} | {ppl['dense']:.2f} | "
            f"{ppl['pruned']:.2f} | {healed} | {r['heal_seconds']:.0f} s | {r['steps']} | {r['peak_rss_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="wanda:none,wanda:starfish", help="PRUNER:HEALER[:N:M],... e.g. wanda:starfish:2:4")
    parser.add_argument("--epochs", type=int, default=None, help="healing epochs (default: the recipe's 10)")
    parser.add_argument("--heal-scope", default=None, help="joint (default) or blockwise")
    parser.add_argument("--batch-size", type=int, default=None, help="healing batch size (default: the recipe's 32)")
    parser.add_argument("--lr", type=float, default=None, help="healing learning rate (default: the recipe's 6e-4)")
    args = parser.parse_args()
    if not (MODEL / "config.json").is_file():
        sys.exit(f"no SmolLM2 folder at {MODEL}: run python scripts/install_smollm2.py first")
    from starfish import run

    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    for cell in args.cells.split(","):
        pruner, healer, *nm = cell.split(":")
        pattern = ":".join(nm) if nm else None
        started = time.perf_counter()
        report = run(cell_config(pruner, healer, pattern, args))
        import resource

        rows.append({
            "pruner": pruner, "pattern": pattern, "healer": healer, "scope": report["heal"].get("scope", "joint"),
            "perplexity": report["perplexity"], "fidelity_to_dense": report["fidelity_to_dense"],
            "heal_seconds": report["heal_seconds"], "steps": report["heal"].get("steps", 0),
            "heal": {k: report["heal"].get(k) for k in ("epochs", "batch_size", "lr", "min_lr", "optimizer", "cache_dtype")},
            "wall_seconds": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "eval": report["eval"], "calibration": report["calibration"], "sparsity": report["sparsity"],
            "command": "python benchmarks/lm_heal.py " + " ".join(sys.argv[1:]),
            "threads": torch.get_num_threads(),
        })
        RESULTS.write_text(json.dumps({"model": str(MODEL.name), "rows": rows}, indent=2) + "\n")
        print(render(rows[-1:]), flush=True)
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
