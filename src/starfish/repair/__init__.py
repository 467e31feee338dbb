"""Label-free repairs applied after pruning, before (or instead of) healing: forward passes only.

``apply_repair(name, dense, sparse, masks, calibration, **options)`` works in place on ``sparse``
and returns a small dict of statistics. Every repair keeps masked weights exactly zero.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.masks import Masks
from starfish.repair.bn import recalibrate_batchnorm
from starfish.repair.varmatch import variance_match


def _none(dense, sparse, masks, calibration, **options) -> dict:
    return {}


def _bn(dense, sparse, masks, calibration, batch_size: int = 100, **options) -> dict:
    return recalibrate_batchnorm(sparse, calibration, batch_size)


def _varmatch(dense, sparse, masks, calibration, shrinkage: float = 0.0, batch_size: int = 64, **options) -> dict:
    return variance_match(dense, sparse, masks, calibration, shrinkage, batch_size)


def _bn_then_varmatch(dense, sparse, masks, calibration, **options) -> dict:
    first = _bn(dense, sparse, masks, calibration, **options)
    return {"bn": first, "varmatch": _varmatch(dense, sparse, masks, calibration, **options)}


REPAIRS: dict[str, Callable[..., dict]] = {"none": _none, "bn": _bn, "varmatch": _varmatch, "bn+varmatch": _bn_then_varmatch}


def list_repairs() -> list[str]:
    return list(REPAIRS)


def apply_repair(name: str, dense: nn.Module, sparse: nn.Module, masks: Masks, calibration: torch.Tensor | None, **options) -> dict:
    """Repair ``sparse`` in place against ``dense`` on unlabeled ``calibration`` images."""
    if name not in REPAIRS:
        raise StarfishError(f"unknown repair '{name}'; choose one of {', '.join(list_repairs())}.")
    if name == "none":
        return {"repair": "none"}
    if calibration is None or len(calibration) == 0:
        raise StarfishError(f"repair '{name}' needs calibration images; pass --calib DIR (or --repair none).")
    stats = REPAIRS[name](dense, sparse, masks, calibration, **options)
    broken = masks.violations(sparse)
    if broken:  # a bug, not a user error
        raise RuntimeError(f"repair {name} broke the mask contract: {broken}")
    return {"repair": name, **stats}


__all__ = ["REPAIRS", "apply_repair", "list_repairs"]
