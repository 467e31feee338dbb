"""Healing objectives: what the sparse model is trained to match. A registry of named objectives.

Each objective says which signals it needs (block outputs, logits, labels); the training loop
(``heal.loop``) captures exactly those, so all healers share one loop and one optimizer budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from starfish.errors import StarfishError


@dataclass
class Signals:
    """What one forward pass produced: block outputs (in block order) and logits."""

    blocks: list[torch.Tensor]
    logits: torch.Tensor | None = None


@dataclass
class Objective:
    name: str
    loss: Callable[[Signals, Signals | None, torch.Tensor | None, "object"], torch.Tensor]
    needs_blocks: bool = False
    needs_dense: bool = True
    uses_labels: bool = False
    description: str = ""


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    OBJECTIVES[objective.name] = objective
    return objective


def list_healers() -> list[str]:
    return sorted(OBJECTIVES)


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise StarfishError(f"unknown healer '{name}'; choose one of {', '.join(list_healers())}.")
    return OBJECTIVES[name]


def cosine_distance(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Mean of (1 - cosine similarity).

    Token sequences (3-D) compare each token's channel vector (every token, CLS included);
    feature maps (4-D) compare each sample's flattened C*H*W map; 2-D compares rows.
    """
    dense = dense.to(sparse.dtype)
    if sparse.dim() >= 4:
        sparse, dense = sparse.flatten(1), dense.flatten(1)
    return (1.0 - F.cosine_similarity(sparse, dense, dim=-1, eps=1e-8)).mean()


def starfish_loss(sparse: Signals, dense: Signals | None, labels, config) -> torch.Tensor:
    """Mean over blocks (equal weights) of the block's mean cosine distance to the dense output."""
    assert dense is not None
    terms = [cosine_distance(s, d) for s, d in zip(sparse.blocks, dense.blocks)]
    return torch.stack(terms).mean()


register_objective(
    Objective(
        "starfish",
        starfish_loss,
        needs_blocks=True,
        description="per-block 1 - cosine alignment with the dense model's block outputs (label-free)",
    )
)


def kd_loss(sparse: Signals, dense: Signals | None, labels, config) -> torch.Tensor:
    """Hinton distillation: T^2 * KL(softmax(dense/T) || softmax(sparse/T)), averaged over images.

    The T^2 factor keeps gradient magnitudes comparable across temperatures.
    """
    assert dense is not None and sparse.logits is not None and dense.logits is not None
    t = float(getattr(config, "temperature", 1.0))
    log_q = F.log_softmax(sparse.logits / t, dim=-1)
    log_p = F.log_softmax(dense.logits.to(sparse.logits.dtype) / t, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (t * t)


def finetune_loss(sparse: Signals, dense: Signals | None, labels, config) -> torch.Tensor:
    """Plain cross-entropy with the calibration labels: the supervised reference point."""
    assert labels is not None and sparse.logits is not None
    return F.cross_entropy(sparse.logits, labels)


def normalized_mse(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """||sparse - dense||^2 / ||dense||^2 over the batch: MSE that ignores each block's scale."""
    dense = dense.to(sparse.dtype)
    return (sparse - dense).pow(2).sum() / dense.pow(2).sum().clamp_min(1e-12)


def nmse_loss(sparse: Signals, dense: Signals | None, labels, config) -> torch.Tensor:
    """Sum over blocks of the normalized MSE to the dense block output (global activation matching)."""
    assert dense is not None
    return torch.stack([normalized_mse(s, d) for s, d in zip(sparse.blocks, dense.blocks)]).sum()


register_objective(
    Objective(
        "kd",
        kd_loss,
        description="KL divergence between dense and sparse logits at --temperature (label-free)",
    )
)
register_objective(
    Objective(
        "finetune",
        finetune_loss,
        needs_dense=False,
        uses_labels=True,
        description="cross-entropy with the calibration images' labels (USES LABELS)",
    )
)
register_objective(
    Objective(
        "nmse",
        nmse_loss,
        needs_blocks=True,
        description="per-block output MSE normalized by the dense output's energy, summed over blocks (label-free)",
    )
)
