"""Does storing the dense targets in float16 (the default) move healing? fp32 vs fp16 vs bf16 caches.

Same pruned weights, same calibration images (seed 0) and the same shuffling, so the only
difference is the dtype of the cached block outputs. Reports the last loss, the largest weight
difference to the float32-cache run, top-1 on a class-balanced test subset, and the fraction of
test predictions that agree with the float32-cache run.

    python benchmarks/cache_dtype_check.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

from starfish.data.images import load_folder
from starfish.tasks.evaluate import predict, top1
from starfish.heal import HealConfig, heal
from starfish.models import create_model
from starfish.pruning import PruneConfig, prune

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
WEIGHTS = {"cifar10-vit": "vit_cifar10_smmk47.pth", "cifar10-resnet20": "resnet20_akamaster.th"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cifar10-resnet20,cifar10-vit")
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "cache_dtype_check.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.models.split(","):
        loaded = create_model(spec, SHARED / "models" / WEIGHTS[spec])
        transform = loaded.preprocess.transform()
        calib = load_folder(SHARED / "data/cifar10/train", transform, 200, 0, "calibration", balanced=False, progress=False)[0]
        evalset = load_folder(SHARED / "data/cifar10/test", transform, args.eval_size, 0, "eval", balanced=True, progress=False)[0]
        dense = loaded.module
        base = copy.deepcopy(dense)
        masks = prune(base, PruneConfig(sparsity=args.sparsity))
        reference = None
        for dtype in ("float32", "float16", "bfloat16"):
            sparse = copy.deepcopy(base)
            result = heal(dense, sparse, masks, calib, HealConfig(cache_dtype=dtype, device="cpu", progress=False), block_pattern=loaded.block_pattern)
            pred = predict(sparse, evalset, device="cpu")
            if reference is None:
                reference = (sparse.state_dict(), pred)
            weight_diff = max(float((v.float() - reference[0][k].float()).abs().max()) for k, v in sparse.state_dict().items() if v.is_floating_point())
            agree = float((pred.logits.argmax(1) == reference[1].logits.argmax(1)).float().mean())
            row = {"model": spec, "sparsity": args.sparsity, "cache_dtype": dtype, "loss_last": result.loss_history[-1],
                   "max_weight_diff_vs_fp32": weight_diff, "top1": top1(pred), "agreement_with_fp32": agree, "eval_size": args.eval_size}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
