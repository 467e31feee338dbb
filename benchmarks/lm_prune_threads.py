"""Does the number of CPU threads change what a pruner removes from SmolLM2-135M?

The same `starfish run` protocol (calibration 32 x 512 tokens of valid.tokenized.txt, seed 0, 50%
per layer) pruned twice in one process, once per thread count (``torch.set_num_threads``), from
the same dense weights and the same calibration batch. Reports how many mask entries and pruned
weights differ between the two. Float reductions are summed in another order with more threads,
so a pruner that solves linear systems in sequence (SparseGPT) can end up with other masks; one
that ranks a fixed score (magnitude, Wanda) should not. Results to results/lm_prune_threads.json.

    python scripts/install_smollm2.py
    python benchmarks/lm_prune_threads.py --pruner sparsegpt --threads 1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lm_heal import MODEL, REPO, SHARED

RESULTS = REPO / "benchmarks" / "results" / "lm_prune_threads.json"


def main() -> int:
    from starfish.run_config import RunConfig
    from starfish.steps import build_model, load_data, prune_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruner", default="sparsegpt")
    parser.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 (default 50%% unstructured)")
    parser.add_argument("--threads", default="1,2", help="thread counts to compare, comma-separated")
    args = parser.parse_args()
    config = RunConfig(model=f"hf:{MODEL}", calib=str(SHARED / "data/wikitext2/valid.tokenized.txt"), calib_size=32, seed=0)
    config = config.with_prune(sparsity=0.5, pruner=args.pruner, pattern=args.pattern)
    loaded = build_model(config)
    data = load_data(config, loaded, evaluation=False, held_out=False)
    runs = {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        started = time.perf_counter()
        sparse, masks, _, _ = prune_step(config, loaded.module, data.calibration)
        runs[threads] = (sparse.state_dict(), masks, time.perf_counter() - started)
    (a, *rest) = runs
    weights_a, masks_a, _ = runs[a]
    rows = []
    for b in rest:
        weights_b, masks_b, _ = runs[b]
        differ = sum(int((masks_a[n] != masks_b[n]).sum()) for n in masks_a.names())
        max_weight_gap = max(float((weights_a[n] - weights_b[n]).abs().max()) for n in masks_a.names())
        rows.append({"threads": [a, b], "mask_entries": masks_a.numel(), "mask_entries_that_differ": differ,
                     "largest_weight_difference": max_weight_gap})
    result = {
        "pruner": args.pruner, "pattern": args.pattern, "calibration": {"size": 32, "seq_len": 512, "seed": 0},
        "seconds": {str(t): r[2] for t, r in runs.items()}, "comparisons": rows,
        "command": "python benchmarks/lm_prune_threads.py " + " ".join(sys.argv[1:]),
    }
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    saved = [s for s in saved if (s["pruner"], s["pattern"]) != (args.pruner, args.pattern)] + [result]
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
