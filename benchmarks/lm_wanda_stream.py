"""Wanda on SmolLM2 calibrated on the pruned stream (as the Wanda reference code) or the dense stream.

starfish's Wanda feeds every layer the *dense* network's activations (the stream passed from block
to block is the unpruned block's output), so its masks equal those of one pass of the dense model.
The Wanda reference code instead passes each pruned layer's output on to the next. This script
measures what that difference does to the pruned perplexity on the protocol of the LM benchmark
(``BENCHMARKS.md``: WikiText-2 test, first 6 windows of 2048 tokens; calibration 32 x 512 tokens of
valid.tokenized.txt, seed 0), by letting the sequential pipeline propagate Wanda's pruned block
outputs (``Pruner.reconstructs``, the switch SparseGPT uses). No healing.

    OMP_NUM_THREADS=1 python benchmarks/lm_wanda_stream.py --stream pruned --pattern 2:4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
MODEL = Path(os.environ.get("STARFISH_SMOLLM2", REPO / ".cache" / "smollm2-135m"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", choices=["pruned", "dense"], default="pruned")
    parser.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 (default: 50%% unstructured)")
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/lm_wanda_stream.json"))
    args = parser.parse_args()

    from starfish.heal import HealConfig
    from starfish.experiments.run import run
    from starfish.pruning import PruneConfig
    from starfish.pruning.pruners.wanda import Wanda
    from starfish.experiments.run_config import RunConfig

    Wanda.reconstructs = args.stream == "pruned"  # the sequential pipeline then passes pruned block outputs on
    text = SHARED / "data" / "wikitext2"
    config = RunConfig(
        model=f"hf:{MODEL}", calib=str(text / "valid.tokenized.txt"), calib_size=32, seq_len=512,
        eval=str(text / "test.txt"), eval_size=6, eval_seq_len=2048, seed=0,
        prune=PruneConfig(sparsity=0.5, pruner="wanda", pattern=args.pattern),
        heal=HealConfig(healer="none", device="cpu", progress=False),
    )
    started = time.perf_counter()
    report = run(config)
    row = {"stream": args.stream, "pattern": args.pattern, "perplexity": report["perplexity"],
           "sparsity": report["sparsity"], "seconds": time.perf_counter() - started,
           "command": "OMP_NUM_THREADS=1 python benchmarks/lm_wanda_stream.py " + " ".join(sys.argv[1:])}
    path = Path(args.json)
    rows = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*rows, row], indent=1) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
