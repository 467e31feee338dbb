"""STARFISH on a vit-pytorch style encoder (residual adds outside its modules): alignment on the
residual stream (automatic ``stream_points``) versus on the blocks' own outputs (branch increments).

Usage: PYTHONPATH=src:tests OMP_NUM_THREADS=1 python benchmarks/stream_vs_branch_points.py SPARSITY STEPS
Prints KL(dense || healed) and top-1 agreement with the dense model on 256 held-out inputs.
"""

import copy
import importlib
import sys

import torch

from any_network_models import LoopViT
from starfish.heal import HealConfig, heal
from starfish.pruning import prune
from starfish.structure import StreamPoint, find_blocks

loop = importlib.import_module("starfish.heal.loop")


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=16, mode="bilinear")
    return coarse + 0.3 * torch.randn(n, 3, 16, 16, generator=g)


def label(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :, :8].mean((1, 2, 3)) > x[:, :, 8:].mean((1, 2, 3))).long() + 2 * (x[:, 0].mean((1, 2)) > 0).long()


def main(sparsity: float, steps: int) -> None:
    torch.manual_seed(0)
    dense = LoopViT()
    train = images(2048, 3)
    opt = torch.optim.Adam(dense.parameters(), 3e-3)
    for _ in range(300):
        idx = torch.randint(0, 2048, (64,))
        loss = torch.nn.functional.cross_entropy(dense(train[idx]), label(train[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    dense.eval()
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
