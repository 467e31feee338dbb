"""``starfish demo``: the whole method on real data that ships with scikit-learn, offline.

scikit-learn bundles 1,797 real 8x8 handwritten digits. The demo trains a small residual network
on 75% of them once (cached), prunes it, heals it on 100 unlabeled training images and prints the
dense / pruned / healed table on the held-out 25%.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from starfish.tasks.evaluate import predict, summarize
from starfish.heal import HealConfig, heal
from starfish.models.cifar import BasicBlock
from starfish.pruning import PruneConfig, prune
from starfish.reporting.report import pct


class DigitsResNet(nn.Module):
    """Stem conv, four residual blocks, pooled linear head: 8x8 grayscale in, 10 classes out."""

    def __init__(self, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[BasicBlock(width, width) for _ in range(depth)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def cache_dir() -> Path:
    return Path(os.environ.get("STARFISH_CACHE", Path.home() / ".cache" / "starfish"))


def digits_splits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """A fixed stratified 75/25 split of scikit-learn's digits, scaled to mean 0, std 1."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=seed, stratify=y.numpy())
    return TensorDataset(x[idx_train], y[idx_train]), TensorDataset(x[idx_test], y[idx_test])


def train_dense(train: TensorDataset, epochs: int = 10, seed: int = 0) -> DigitsResNet:
    torch.manual_seed(seed)
    model = DigitsResNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(train) + 63) // 64))
    x, y = train.tensors
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = order[i : i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def dense_demo_model(train: TensorDataset, retrain: bool = False) -> DigitsResNet:
    """Train once, then reuse the cached weights (written atomically)."""
    from safetensors.torch import load_file, save_file

    from starfish.common.outputs import apply_umask

    path = cache_dir() / "demo-digits-resnet.safetensors"
    if path.is_file() and not retrain:
        model = DigitsResNet()
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    print("training the dense demo network once (cached at", path, ")")
    model = train_dense(train)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    apply_umask(tmp)
    tmp.replace(path)
    return model


def run_demo(sparsity: float = 0.8, seed: int = 0, retrain: bool = False) -> dict:
    train, test = digits_splits()
    dense = dense_demo_model(train, retrain)
    g = torch.Generator().manual_seed(seed)
    calib = train.tensors[0][torch.randperm(len(train), generator=g)[:100]]  # images only: no labels
    dense_pred = predict(dense, test, device="cpu")
    sparse = copy.deepcopy(dense)
    masks = prune(sparse, PruneConfig(sparsity=sparsity), seed=seed)
    pruned_pred = predict(sparse, test, device="cpu")
    result = heal(dense, sparse, masks, calib, HealConfig(seed=seed, device="cpu"))
    healed_pred = predict(sparse, test, device="cpu")
    rows = {"dense": summarize(dense_pred), "pruned": summarize(pruned_pred, dense_pred), "healed": summarize(healed_pred, dense_pred)}
    print(
        f"\nstarfish demo: scikit-learn digits ({len(test)} held-out images), DigitsResNet, "
        f"{pct(masks.sparsity())} of block weights removed (magnitude, uniform), "
        f"healed on {len(calib)} unlabeled images in {result.seconds:.1f} s\n"
    )
    print(f"{'model':10s} {'top-1':>8s} {'agrees w/ dense':>16s}")
    for label, stats in rows.items():
        print(f"{label:10s} {pct(stats['top1']):>8s} {pct(stats.get('agreement')) if 'agreement' in stats else '—':>16s}")
    assert not masks.violations(sparse)
    return rows
