"""Label-free repairs applied after pruning, before (or instead of) healing: forward passes only.

``apply_repair(name, dense, sparse, masks, calibration, **options)`` works in place on ``sparse``
and returns a small dict of statistics. Every repair keeps masked weights exactly zero.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from starfish.nn.batch import batch_len, calibration_set
from starfish.errors import StarfishError
from starfish.registry import Registry
from starfish.masks import Masks
from starfish.repair.bn import BN_TYPES, recalibrate_batchnorm
from starfish.repair.varmatch import variance_match


def _none(dense, sparse, masks, calibration, **options) -> dict:
    return {}


def _bn(dense, sparse, masks, calibration, batch_size: int = 100, **options) -> dict:
    return recalibrate_batchnorm(sparse, calibration, batch_size)


def _varmatch(dense, sparse, masks, calibration, shrinkage: float = 0.0, batch_size: int = 64, scheme: str = "layer", **options) -> dict:
    return variance_match(dense, sparse, masks, calibration, shrinkage, batch_size, scheme)


def _bn_then_varmatch(dense, sparse, masks, calibration, **options) -> dict:
    first = _bn(dense, sparse, masks, calibration, **options)
    return {"bn": first, "varmatch": _varmatch(dense, sparse, masks, calibration, **options)}


REPAIRS: Registry[Callable[..., dict]] = Registry("repair")
for _name, _repair in {"none": _none, "bn": _bn, "varmatch": _varmatch, "bn+varmatch": _bn_then_varmatch}.items():
    REPAIRS.add(_name, _repair)
AUTO = "auto"


def list_repairs() -> list[str]:
    return REPAIRS.names()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, BN_TYPES) for m in model.modules())


def resolve_repair(name: str, model: nn.Module, trained_healer: bool, bn_mode: str, has_calibration: bool = True) -> tuple[str, str]:
    """The concrete repair for ``name`` and, for ``auto``, why it was chosen.

    ``auto`` picks variance matching, except where something else already does its job:
    - a network with BatchNorm healed with BatchNorm in train mode: every BatchNorm re-normalises its
      channels on the sparse network's own batch statistics while healing, and the repair on top is
      a gamble (ResNet-20: -1.7 points at 50%, +2.7 on average at 90-96%; ResNet-56: -3.5 on average
      at 90-96%, down to -9.8; benchmarks/COMPARE.md and SWEEP.md), so nothing is added;
    - no calibration images: nothing to measure on.
    Everywhere else it helps a lot (ViT before STARFISH healing, mean of five calibration draws:
    +0.5 / +7.3 / +21.0 points at 50 / 75 / 90%, BENCHMARKS.md; ResNet-20 without healing:
    40.9 -> 69.4% at 75%, benchmarks/COMPARE.md).
    """
    if name != AUTO:
        return name, "as requested"
    if not has_calibration:
        return "none", "auto: no calibration images to measure on"
    if trained_healer and bn_mode == "train" and has_batchnorm(model):
        return "none", "auto: BatchNorm in train mode re-normalises every channel while healing"
    return "varmatch", "auto: variance matching before " + ("healing" if trained_healer else "evaluation")


def apply_repair(name: str, dense: nn.Module, sparse: nn.Module, masks: Masks, calibration: object, **options) -> dict:
    """Repair ``sparse`` in place against ``dense`` on unlabeled ``calibration`` data (a batch
    mapping, or an image tensor / TensorDataset)."""
    if name not in REPAIRS:
        raise StarfishError(f"unknown repair '{name}'; choose one of {', '.join(list_repairs())}.")
    if name == "none":
        return {"repair": "none"}
    if calibration is None or batch_len(calibration_set(calibration)) == 0:
        raise StarfishError(f"repair '{name}' needs calibration images; pass --calib DIR (or --repair none).")
    stats = REPAIRS[name](dense, sparse, masks, calibration, **options)
    broken = masks.violations(sparse)
    if broken:  # a bug, not a user error
        raise RuntimeError(f"repair {name} broke the mask contract: {broken}")
    return {"repair": name, **stats}


__all__ = ["AUTO", "REPAIRS", "apply_repair", "has_batchnorm", "list_repairs", "resolve_repair"]
