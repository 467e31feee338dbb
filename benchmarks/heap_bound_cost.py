"""What the fixed mmap threshold (``nn.device.bound_heap_growth``) costs in time and buys in memory.

Protocol: one process per variant (the threshold is process-wide and sticky), run one after the
other: SmolLM2-135M from the installed folder, Wanda 50% on 32 calibration sequences of 512 tokens
from ../shared/data/wikitext2/valid.tokenized.txt (seed 0), then block-wise STARFISH, 2 epochs at
batch 8, under ``--precision native``, through the public API. ``bound``: what ``run`` and
``compare`` do (1 MB threshold before the first pass; block-wise healing lowers it to 128 kB).
``bound-1mb``: the same with block-wise healing at 1 MB too. ``dynamic``: glibc's
own adaptive threshold throughout (``bound_heap_growth`` made a no-op). Reported: pruning and heal
seconds, what healing added to the resident set (its peak minus the memory at its start) and the
plan's figure for it. Writes benchmarks/results/heap_bound_cost.json and prints a markdown table.

    OMP_NUM_THREADS=2 python benchmarks/heap_bound_cost.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

from lm_heal import MODEL, REPO
from lm_heal_memory import CALIB

RESULTS = REPO / "benchmarks" / "results" / "heap_bound_cost.json"
VARIANTS = ("bound", "bound-1mb", "dynamic")


def child(variant: str) -> dict:
    from starfish.nn import device

    from starfish.heal import healing

    if variant == "dynamic":
        device.bound_heap_growth = healing.bound_heap_growth = lambda threshold=0: False
    if variant == "bound-1mb":
        healing.BLOCKWISE_MMAP_THRESHOLD = device.MMAP_THRESHOLD
    from starfish.data.text import calibration_text
    from starfish.heal import HealConfig, heal
    from starfish.models import create_model
    from starfish.models.causal_lm import tokenizer_of
    from starfish.pruning import PruneConfig, prune

    device.bound_heap_growth()
    loaded = create_model(f"hf:{MODEL}")
    dense = loaded.module.eval()
    calib = calibration_text(CALIB, tokenizer_of(loaded.extra), 32, 512, seed=0)
    sparse = copy.deepcopy(dense)
    started = time.perf_counter()
    masks = prune(sparse, PruneConfig(sparsity=0.5, pruner="wanda"), seed=0, calibration=calib)
    pruned = time.perf_counter() - started
    config = HealConfig(healer="starfish", scope="blockwise", batch_size=8, epochs=2, device="cpu", progress=False,
                        precision="native", budget="fixed")
    result = heal(dense, sparse, masks, calib, config)
    return {"variant": variant, "prune_seconds": pruned, "heal_seconds": result.seconds, "precision": result.precision,
            "added_mb": result.peak_memory_mb - result.memory_at_start_mb, "planned_added_mb": result.memory_estimate["added_mb"]["cpu"],
            "violations": sum(masks.violations(sparse).values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, run in this order (default {','.join(VARIANTS)})")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    rows = [] if args.variants == ",".join(VARIANTS) or not RESULTS.exists() else json.loads(RESULTS.read_text())["rows"]
    for variant in args.variants.split(","):
        rows = [r for r in rows if r["variant"] != variant]
        done = subprocess.run([sys.executable, __file__, "--child", variant], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for r in rows:
        r.setdefault("commit", commit)
    RESULTS.write_text(json.dumps({"command": "python benchmarks/heap_bound_cost.py", "commit": commit,
                                   "threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}, indent=2) + "\n")
    print("| heap | Wanda pass | block-wise heal | added by healing (plan) | plan / measured |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['prune_seconds']:.0f} s | {r['heal_seconds']:.0f} s | +{r['added_mb']:,.0f} MB ({r['planned_added_mb']:,.0f}) | "
              f"{r['planned_added_mb'] / r['added_mb']:.2f} |")


if __name__ == "__main__":
    main()
