"""Pruners decide which weights go. A registry, so new ones plug in by name.

A pruner either *scores* weights (low scores go first; compared within the whole layer or within
each output row) or, when ``reconstructs`` is set, prunes a layer itself and updates the surviving
weights (SparseGPT). ``needs_calibration`` pruners see input statistics gathered on unlabeled
calibration images: ``"norms"`` (per-input-feature sum of squares) or ``"gram"`` (X^T X).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from starfish.errors import StarfishError

# A scorer gets (weight, generator, input statistics or None) and returns scores of the same shape.
Scorer = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Pruner:
    name: str
    score: Scorer | None = None
    group: str = "layer"  # "layer": one comparison per weight; "row": per output row
    needs_calibration: bool = False
    statistics: str | None = None  # "norms" | "gram": what is gathered on calibration inputs
    reconstructs: bool = False  # prunes sequentially and rewrites surviving weights
    description: str = ""


PRUNERS: dict[str, Pruner] = {}


def add_pruner(pruner: Pruner) -> Pruner:
    PRUNERS[pruner.name] = pruner
    return pruner


def register_pruner(name: str, group: str = "layer", description: str = "") -> Callable[[Scorer], Scorer]:
    """Decorator for a calibration-free scorer ``fn(weight, generator, stats=None)``."""

    def wrap(fn: Scorer) -> Scorer:
        add_pruner(Pruner(name, fn, group, description=description or (fn.__doc__ or "").strip().splitlines()[0]))
        return fn

    return wrap


def list_pruners() -> list[str]:
    return sorted(PRUNERS)


def get_pruner(name: str) -> Pruner:
    if name not in PRUNERS:
        raise StarfishError(f"unknown pruner '{name}'; choose one of {', '.join(list_pruners())}.")
    return PRUNERS[name]


@register_pruner("magnitude")
def magnitude_scores(weight: torch.Tensor, generator: torch.Generator, stats=None) -> torch.Tensor:
    """|W|: the smallest weights go first."""
    return weight.detach().abs().float()


@register_pruner("random")
def random_scores(weight: torch.Tensor, generator: torch.Generator, stats=None) -> torch.Tensor:
    """A control: which weights go is independent of the weights."""
    return torch.rand(weight.shape, generator=generator)


def wanda_scores(weight: torch.Tensor, generator: torch.Generator, stats: torch.Tensor | None = None) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, with ``stats`` the per-input-feature sum of squares of the inputs."""
    if stats is None:
        raise StarfishError("the wanda pruner needs calibration images; pass --calib DIR.")
    rows = weight.detach().reshape(weight.shape[0], -1).abs().float()
    return (rows * stats.float().clamp_min(0).sqrt().unsqueeze(0)).view(weight.shape)


add_pruner(
    Pruner(
        "wanda",
        wanda_scores,
        group="row",
        needs_calibration=True,
        statistics="norms",
        description="|W|·‖X_j‖₂ on calibration inputs, compared within each output row",
    )
)
add_pruner(
    Pruner(
        "sparsegpt",
        None,
        needs_calibration=True,
        statistics="gram",
        reconstructs=True,
        description="OBS pruning with reconstruction of the surviving weights, block by block",
    )
)
