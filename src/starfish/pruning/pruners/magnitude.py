"""Magnitude pruning: the smallest weights go first."""

from __future__ import annotations

import torch

from starfish.pruning.pruners.base import register_pruner


@register_pruner("magnitude")
def magnitude_scores(weight: torch.Tensor, generator: torch.Generator, stats=None) -> torch.Tensor:
    """|W|: the smallest weights go first."""
    return weight.detach().abs().float()
