"""What a pruner is: two small steps, ``calibrate`` and ``compress``, registered by name.

The pipeline (``starfish.pruning.prune``) feeds ``calibrate(target, module, inputs, weights)`` with
every calibration input a target weight sees (block by block, see ``starfish.nn.sequential``), then
asks ``compress(target, weight, budget, pattern)`` for the pruned weight and its keep-mask. A pruner
instance lives for one ``prune`` call, so it keeps its statistics on itself.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.pruning.masking import mask_from_scores
from starfish.registry import Registry
from starfish.nn.structure import Target


class Pruner:
    """Base pruner: scores weights (low scores go first) and keeps the best; no calibration."""

    name: str = ""
    description: str = ""
    group: str = "layer"  # "layer": one comparison per weight; "row": within each output row
    needs_calibration: bool = False
    # compress rewrites the surviving weights, so later layers must be calibrated on the pruned
    # network's outputs (the stream passed on is the compressed block's); otherwise the dense one's
    reconstructs: bool = False

    def __init__(self, seed: int = 0, **options: object) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.options = options

    def calibrate(self, target: Target, module: nn.Module, inputs: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """See one batch of the inputs of ``target`` (``weights``: the batch's position weights)."""

    def gather_statistics(self, names: list[str]) -> None:
        """Combine the statistics of ``names`` that each rank gathered on its share of the
        calibration set (``starfish.distributed``); nothing to do for a pruner without statistics."""

    def scores(self, target: Target, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compress(self, target: Target, weight: torch.Tensor, budget: int, pattern: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pruned weight, keep-mask) removing exactly ``budget`` weights (or the N:M pattern)."""
        keep = mask_from_scores(self.scores(target, weight), budget, self.group, pattern).to(weight.device)
        return weight * keep, keep


PRUNERS: Registry[type[Pruner]] = Registry("pruner")

# A scorer for ``register_pruner``: (weight, generator, statistics or None) -> scores of the same shape.
Scorer = Callable[..., torch.Tensor]


def register_pruner(name: str, group: str = "layer", description: str = "") -> Callable[[Scorer], Scorer]:
    """Decorator registering a calibration-free scorer ``fn(weight, generator, stats=None)``."""

    def wrap(fn: Scorer) -> Scorer:
        class ScorerPruner(Pruner):
            def scores(self, target: Target, weight: torch.Tensor) -> torch.Tensor:
                return fn(weight.detach().cpu(), self.generator, None)

        ScorerPruner.name, ScorerPruner.group = name, group
        ScorerPruner.description = description or (fn.__doc__ or "").strip().splitlines()[0]
        ScorerPruner.__name__ = f"{name}_pruner"
        PRUNERS.add(name, ScorerPruner)
        return fn

    return wrap


def list_pruners() -> list[str]:
    return PRUNERS.names()


def get_pruner(name: str) -> type[Pruner]:
    """The pruner class registered as ``name`` (its attributes describe it; instantiate per run)."""
    try:
        return PRUNERS.get(name)
    except StarfishError:
        raise StarfishError(f"unknown pruner '{name}'; choose one of {', '.join(list_pruners())}.") from None
