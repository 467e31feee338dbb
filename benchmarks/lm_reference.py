#!/usr/bin/env python
"""SmolLM2-135M-Instruct on WikiText-2: dense and magnitude-pruned perplexity (shared protocol).

The protocol of ../shared/README.md: tokenize test.txt once, the first 6 non-overlapping windows
of 2048 tokens, perplexity = exp(mean next-token NLL); magnitude pruning with one threshold per
decoder Linear (``starfish.prune`` with its defaults), embeddings/final norm/lm_head dense. The
pruned model is also compared with the dense one on the same tokens (top-1 agreement, KL).

    python scripts/install_smollm2.py
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lm_reference.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
DEFAULT_MODEL = Path(os.environ.get("STARFISH_SMOLLM2") or REPO / ".cache" / "smollm2-135m")


def main(argv: list[str] | None = None) -> int:
    from starfish.tasks.lm_eval import evaluate_lm
    from starfish.models import create_model
    from starfish.common.outputs import write_json
    from starfish.pruning import PruneConfig, prune
    from starfish.data.text import evaluation_windows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--text", type=Path, default=SHARED / "data" / "wikitext2" / "test.txt")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lm_reference.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    lm = create_model(f"hf:{args.model}")
    windows = evaluation_windows(args.text, lm.extra["tokenizer"], args.seq_len, args.windows)
    loaded_s = time.perf_counter() - start
    sparse = copy.deepcopy(lm.module)
    masks = prune(sparse, PruneConfig(sparsity=args.sparsity))
    start = time.perf_counter()
    metrics = evaluate_lm({"dense": lm.module, "magnitude": sparse}, windows, "cpu")
    eval_s = time.perf_counter() - start
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "model": {"folder": str(args.model), "spec": lm.spec, "parameters": sum(p.numel() for p in lm.module.parameters())},
        "eval": windows.protocol(),
        "pruning": {"pruner": "magnitude", "allocation": "uniform", "sparsity": args.sparsity,
                    "achieved_sparsity": masks.sparsity(), "weights": len(masks)},
        "perplexity": {"dense": metrics["dense"]["perplexity"], "magnitude": metrics["magnitude"]["perplexity"]},
        "metrics": metrics,
        "reference": {"dense": 22.06, "magnitude": 464.8, "source": "../shared/README.md"},
        "timing": {"load_s": round(loaded_s, 1), "evaluate_s": round(eval_s, 1), "threads": args.threads,
                   "machine": f"{platform.processor() or platform.machine()}, shared and busy (timings indicative)"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"dense {result['perplexity']['dense']:.2f} (ref 22.06)  magnitude {args.sparsity:g} "
          f"{result['perplexity']['magnitude']:.1f} (ref 464.8)  -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
