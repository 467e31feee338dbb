"""Pruners score weights: low scores are removed first. A registry, so new ones plug in by name."""

from __future__ import annotations

from typing import Callable

import torch

from starfish.errors import StarfishError

# A scorer gets (weight, generator) and returns scores of the same shape.
Scorer = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
PRUNERS: dict[str, Scorer] = {}


def register_pruner(name: str) -> Callable[[Scorer], Scorer]:
    def wrap(fn: Scorer) -> Scorer:
        PRUNERS[name] = fn
        return fn

    return wrap


def list_pruners() -> list[str]:
    return sorted(PRUNERS)


def get_pruner(name: str) -> Scorer:
    if name not in PRUNERS:
        raise StarfishError(f"unknown pruner '{name}'; choose one of {', '.join(list_pruners())}.")
    return PRUNERS[name]


@register_pruner("magnitude")
def magnitude_scores(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return weight.detach().abs().float()


@register_pruner("random")
def random_scores(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A control: which weights go is independent of the weights."""
    return torch.rand(weight.shape, generator=generator)
