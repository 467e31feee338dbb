"""The default-pipeline column of benchmarks/reference_table.py (varmatch + STARFISH healing on the
CIFAR-10 ViT, 200 calibration images, all 10,000 test images) with varmatch's scheme="block" (a
block's layers measured together), for comparison with BENCHMARKS.md (the default scheme="layer"
gives bit-identical repaired weights to the per-layer loop those numbers came from).

    python benchmarks/varmatch_block_scheme.py benchmarks/results/varmatch_block_scheme.json
"""
import copy, json, sys
from pathlib import Path
import torch
from starfish.data.images import load_folder
from starfish.tasks.evaluate import predict, top1
from starfish.heal import HealConfig, heal
from starfish.models import create_model
from starfish.pruning import PruneConfig, prune
from starfish.repair import apply_repair
torch.set_num_threads(1)
SH = Path("/work/shared")
loaded = create_model("cifar10-vit", SH / "models" / "vit_cifar10_smmk47.pth")
transform = loaded.preprocess.transform()
evalset, _, _ = load_folder(SH / "data/cifar10/test", transform, None, 0, "eval", balanced=True, progress=False)
dense = loaded.module
cells = [(0.5, 1), (0.75, 0), (0.75, 1), (0.9, 0), (0.9, 1)]
rows = []
for sparsity, seed in cells:
    calib = load_folder(SH / "data/cifar10/train", transform, 200, seed, "calibration", balanced=False, progress=False)[0]
    base = copy.deepcopy(dense)
    masks = prune(base, PruneConfig(sparsity=sparsity))
    sparse = copy.deepcopy(base)
    apply_repair("varmatch", dense, sparse, masks, calib.tensors[0], scheme="block")
    heal(dense, sparse, masks, calib, HealConfig(seed=seed, device="cpu", progress=False, bn_mode="train"))
    acc = top1(predict(sparse, evalset, device="cpu"))
    rows.append({"sparsity": sparsity, "seed": seed, "default_pipeline_block_scheme": acc})
    print(rows[-1], flush=True)
    Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
