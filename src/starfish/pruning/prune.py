"""The single verb: ``prune(model, config)`` scores, allocates, builds masks and zeroes weights."""

from __future__ import annotations

import torch
from torch import nn

from starfish.masks import Masks
from starfish.pruning.allocation import allocate
from starfish.pruning.config import PruneConfig
from starfish.pruning.pruners import get_pruner
from starfish.structure import prunable_targets


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask with exactly ``k`` entries removed: the lowest scores (ties broken by position)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.argsort(scores.flatten().float(), stable=True)[:k]] = False
    return keep.view(scores.shape)


@torch.no_grad()
def prune(model: nn.Module, config: PruneConfig | float, seed: int = 0) -> Masks:
    """Prune ``model`` in place and return its masks. Accepts a sparsity as a shortcut."""
    if not isinstance(config, PruneConfig):
        config = PruneConfig(sparsity=float(config))
    config.validate()
    targets = prunable_targets(model, config.include, config.exclude, config.blocks)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    scorer = get_pruner(config.pruner)
    scores = {t.name: scorer(params[t.name].detach().cpu(), generator) for t in targets}
    counts = allocate(config.allocation, scores, config.sparsity)
    masks = Masks({name: lowest_k_mask(scores[name], counts[name]) for name in scores})
    masks.apply_(model)
    return masks
