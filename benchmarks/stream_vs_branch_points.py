"""STARFISH on a vit-pytorch style encoder (residual adds outside its modules): alignment on the
residual stream (automatic ``stream_points``) versus on the blocks' own outputs (branch increments).

Usage: PYTHONPATH=src:tests OMP_NUM_THREADS=1 python benchmarks/stream_vs_branch_points.py SPARSITY STEPS
Prints KL(dense || healed) and top-1 agreement with the dense model on 256 held-out inputs.
"""

import copy
import importlib
import sys

import torch

from any_network_models import synthetic_images as images
from any_network_models import synthetic_label as label
from any_network_models import trained_loop_vit
from starfish.heal import HealConfig, heal
from starfish.pruning import prune
from starfish.nn.structure import StreamPoint, find_blocks

loop = importlib.import_module("starfish.heal.healing")


def main(sparsity: float, steps: int) -> None:
    dense = trained_loop_vit()
    calib, held = images(128, 1), images(256, 2)
    with torch.no_grad():
        print(f"dense top-1 on the synthetic task: {(dense(held).argmax(1) == label(held)).float().mean().item():.4f}")
    automatic = loop.stream_points
    branch = lambda model, batch, pattern=None, device=None: [StreamPoint(n, n, "output") for n, _ in find_blocks(model, pattern, batch)]  # noqa: E731
    for name, points in (("stream", automatic), ("branch", branch)):
        loop.stream_points = points
        sparse = copy.deepcopy(dense)
        masks = prune(sparse, sparsity)
        heal(dense, sparse, masks, calib, HealConfig(max_steps=steps, epochs=100, batch_size=32, lr=1e-3, progress=False, device="cpu"))
        with torch.no_grad():
            d, s = dense(held), sparse(held)
        kl = torch.nn.functional.kl_div(s.log_softmax(1), d.log_softmax(1), log_target=True, reduction="batchmean").item()
        agree = (d.argmax(1) == s.argmax(1)).float().mean().item()
        print(f"{name}: KL {kl:.4f}, agreement {agree:.4f}")
    loop.stream_points = automatic


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.7, int(sys.argv[2]) if len(sys.argv) > 2 else 60)
