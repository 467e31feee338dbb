"""Allocations decide how many weights each layer loses so that the total meets the budget exactly."""

from __future__ import annotations

import math
from typing import Callable

import torch

from starfish.errors import StarfishError

# An allocation gets {name: scores} and the global sparsity; returns {name: number of weights to prune}.
Allocation = Callable[[dict[str, torch.Tensor], float], dict[str, int]]
ALLOCATIONS: dict[str, Allocation] = {}


def register_allocation(name: str) -> Callable[[Allocation], Allocation]:
    def wrap(fn: Allocation) -> Allocation:
        ALLOCATIONS[name] = fn
        return fn

    return wrap


def list_allocations() -> list[str]:
    return sorted(ALLOCATIONS)


def allocate(name: str, scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, int]:
    if name not in ALLOCATIONS:
        raise StarfishError(f"unknown allocation '{name}'; choose one of {', '.join(list_allocations())}.")
    counts = ALLOCATIONS[name](scores, sparsity)
    budget = budget_of(scores, sparsity)
    assert sum(counts.values()) == budget, f"allocation {name} missed the budget: {sum(counts.values())} != {budget}"
    return counts


def budget_of(scores: dict[str, torch.Tensor], sparsity: float) -> int:
    return int(round(sparsity * sum(s.numel() for s in scores.values())))


def round_to_budget(wanted: dict[str, float], sizes: dict[str, int], budget: int) -> dict[str, int]:
    """Integer counts close to ``wanted`` (largest remainders) that sum to ``budget`` exactly."""
    counts = {k: min(sizes[k], max(0, math.floor(v))) for k, v in wanted.items()}
    left = budget - sum(counts.values())
    order = sorted(wanted, key=lambda k: wanted[k] - math.floor(wanted[k]), reverse=(left > 0))
    step = 1 if left > 0 else -1
    while left != 0:
        moved = False
        for k in order:
            if left == 0:
                break
            if 0 <= counts[k] + step <= sizes[k]:
                counts[k] += step
                left -= step
                moved = True
        if not moved:
            raise StarfishError("cannot meet the sparsity budget with these layer sizes.")
    return counts


@register_allocation("uniform")
def uniform(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, int]:
    """Every layer loses the same fraction (to within one weight)."""
    sizes = {k: s.numel() for k, s in scores.items()}
    return round_to_budget({k: sparsity * n for k, n in sizes.items()}, sizes, budget_of(scores, sparsity))


@register_allocation("global")
def global_threshold(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, int]:
    """One threshold over all layers' scores: the lowest-scoring weights anywhere go first."""
    names = list(scores)
    flat = torch.cat([scores[k].flatten().float() for k in names])
    budget = budget_of(scores, sparsity)
    owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([scores[k].numel() for k in names]))
    order = torch.argsort(flat, stable=True)[:budget]
    per_layer = torch.bincount(owner[order], minlength=len(names))
    return {k: int(per_layer[i]) for i, k in enumerate(names)}
