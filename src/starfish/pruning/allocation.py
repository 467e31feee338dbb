"""Allocations decide how many weights each layer loses so that the total meets the budget exactly.

An allocation sees the layers' weights (their magnitudes, not a pruner's scores, so one allocation
means the same layer budgets whichever pruner then picks the weights) and, when it needs the
network itself (``rr``), an ``AllocationContext`` with the model and calibration images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from starfish.errors import StarfishError
from starfish.registry import Registry


@dataclass
class AllocationContext:
    """What an allocation may look at beyond the weights (used by ``rr``)."""

    model: object = None
    targets: list = field(default_factory=list)
    calibration: object = None  # a batch mapping or an image tensor
    options: dict = field(default_factory=dict)  # keyword options for the allocation's measurement
    notes: dict = field(default_factory=dict)  # what the allocation measured, for the report


# An allocation gets {name: weight}, the global sparsity and a context; returns {name: weights to prune}.
Allocation = Callable[[dict[str, torch.Tensor], float, AllocationContext | None], dict[str, int]]
ALLOCATIONS: Registry[Allocation] = Registry("allocation")


def register_allocation(name: str) -> Callable[[Allocation], Allocation]:
    def wrap(fn: Allocation) -> Allocation:
        ALLOCATIONS.add(name, fn)
        return fn

    return wrap


def list_allocations() -> list[str]:
    return ALLOCATIONS.names()


def allocate(
    name: str, weights: dict[str, torch.Tensor], sparsity: float, context: AllocationContext | None = None
) -> dict[str, int]:
    if name not in ALLOCATIONS:
        raise StarfishError(f"unknown allocation '{name}'; choose one of {', '.join(list_allocations())}.")
    scores = weights
    counts = ALLOCATIONS[name](weights, sparsity, context)
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
def uniform(scores: dict[str, torch.Tensor], sparsity: float, context: AllocationContext | None = None) -> dict[str, int]:
    """Every layer loses the same fraction (to within one weight)."""
    sizes = {k: s.numel() for k, s in scores.items()}
    return round_to_budget({k: sparsity * n for k, n in sizes.items()}, sizes, budget_of(scores, sparsity))


@register_allocation("global")
def global_threshold(scores: dict[str, torch.Tensor], sparsity: float, context: AllocationContext | None = None) -> dict[str, int]:
    """One magnitude threshold over all layers: the smallest weights anywhere go first."""
    return threshold_counts({k: w.abs().float() for k, w in scores.items()}, sparsity)


def threshold_counts(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, int]:
    """Per-layer counts of one global threshold over comparable scores (lowest go first)."""
    names = list(scores)
    flat = torch.cat([scores[k].flatten().float() for k in names])
    budget = budget_of(scores, sparsity)
    owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([scores[k].numel() for k in names]))
    order = torch.argsort(flat, stable=True)[:budget]
    per_layer = torch.bincount(owner[order], minlength=len(names))
    return {k: int(per_layer[i]) for i, k in enumerate(names)}


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """ERK: density_l ∝ sum(dims)/prod(dims), scaled so the kept total is ``density`` of all.

    Layers whose scaled density would exceed 1 are kept dense and the rest rescaled, repeatedly,
    until no layer exceeds 1 (Evci et al., 2020).
    """
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    kept_total = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [k for k in shapes if k not in dense]
        budget = kept_total - sum(sizes[k] for k in dense)
        weight = sum(raw[k] * sizes[k] for k in free)
        eps = budget / weight if weight > 0 else 0.0
        over = [k for k in free if eps * raw[k] > 1.0]
        if not over:
            break
        dense.update(over)
    return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}


@register_allocation("erk")
def erk(weights: dict[str, torch.Tensor], sparsity: float, context: AllocationContext | None = None) -> dict[str, int]:
    """Erdős–Rényi-Kernel densities, capped at dense, scaled to the budget."""
    densities = erk_densities({k: tuple(w.shape) for k, w in weights.items()}, 1.0 - sparsity)
    sizes = {k: w.numel() for k, w in weights.items()}
    wanted = {k: (1.0 - densities[k]) * sizes[k] for k in weights}
    return round_to_budget(wanted, sizes, budget_of(weights, sparsity))


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score of each weight: w_u^2 / sum of w_v^2 over weights at least as large (Lee et al., 2021).

    Weights are ranked by magnitude (ties by position); the largest weight of every layer scores 1.
    """
    flat = weight.detach().flatten().double() ** 2
    order = torch.argsort(flat, stable=True)
    sorted_sq = flat[order]
    tail = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])  # sum over ranks >= u
    scores = torch.empty_like(flat)
    scores[order] = torch.where(tail > 0, sorted_sq / tail.clamp_min(1e-300), torch.zeros_like(tail))
    return scores.view(weight.shape)


@register_allocation("lamp")
def lamp(weights: dict[str, torch.Tensor], sparsity: float, context: AllocationContext | None = None) -> dict[str, int]:
    """One global threshold over LAMP scores."""
    return threshold_counts({k: lamp_scores(w) for k, w in weights.items()}, sparsity)


@register_allocation("rr")
def rr_allocation(weights: dict[str, torch.Tensor], sparsity: float, context: AllocationContext | None = None) -> dict[str, int]:
    """LAMP scores scaled per layer by its Relative Repairability, then one global threshold.

    See ``starfish.pruning.repairability.rr_factors`` for the rule and why.
    """
    if context is None or context.model is None or context.calibration is None:
        raise StarfishError("allocation 'rr' measures each layer's repairability on calibration images; pass --calib DIR.")
    from starfish.pruning.repairability import measure_rr, rr_factors

    rows = measure_rr(context.model, context.targets, context.calibration, sparsity, **context.options)
    factors = rr_factors(rows)
    context.notes["rr"] = rows
    return threshold_counts({k: lamp_scores(w) * factors[k] for k, w in weights.items()}, sparsity)
