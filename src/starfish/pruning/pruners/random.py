"""Random pruning: a control whose choice ignores the weights."""

from __future__ import annotations

import torch

from starfish.pruning.pruners.base import register_pruner


@register_pruner("random")
def random_scores(weight: torch.Tensor, generator: torch.Generator, stats=None) -> torch.Tensor:
    """A control: which weights go is independent of the weights."""
    return torch.rand(weight.shape, generator=generator)
