"""Healing objectives: what the sparse model is trained to match. A registry of named objectives.

Each objective says which signals it needs (block outputs, logits, labels); the training loop
(``heal.healing``) captures exactly those, so all healers share one loop and one optimizer budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from starfish.errors import StarfishError
from starfish.registry import Registry


@dataclass
class Signals:
    """What one forward pass produced: block outputs (in block order) and logits, plus the batch's
    per-position weights ((N, L), padding = 0; None for images) that every loss honours."""

    blocks: list[torch.Tensor]
    logits: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # a causal LM's final hidden state, when the head is left to the loss
    head: torch.nn.Module | None = None  # the linear head that turns ``hidden`` into logits (heal.vocab)
    head_dtype: torch.dtype | None = None  # what the head's product runs in: the run's autocast dtype (None: the head's own)


@dataclass
class Objective:
    name: str
    loss: Callable[[Signals, Signals | None, torch.Tensor | None, "object"], torch.Tensor]
    needs_blocks: bool = False
    needs_dense: bool = True
    uses_labels: bool = False
    needs_logits: bool = True  # False: the dense logits are never read, so they are not cached
    description: str = ""
    reads: str = "stream"  # where block signals are read: "stream" (the residual stream) or "norm" (after the
    # next layer's input norm; ``heal.norms.norm_points``)
    settle: Callable[[Signals, Signals, "object"], "object"] | None = None  # fills config values the loss derives
    # from the data (starfish_kd's balance) from the first batch, before any update; returns the config to train with
    saved_block_copies: int = 2  # float32 copies of each aligned block signal the loss keeps until backward (the
    # memory plan counts them; 2 is the safe guess for an objective registered from outside)


OBJECTIVES: Registry[Objective] = Registry("healer")


def register_objective(objective: Objective) -> Objective:
    OBJECTIVES.add(objective.name, objective)
    return objective


def list_healers() -> list[str]:
    return OBJECTIVES.names()


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise StarfishError(f"unknown healer '{name}'; choose one of {', '.join(list_healers())}.")
    return OBJECTIVES[name]


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the positions that count (weights of ``values``' shape, 0 = padding)."""
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1e-12)


def _position_weights(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | None:
    """The (N, L) weights when ``values`` is per position (N, L); None (plain mean) otherwise."""
    if weights is None or tuple(values.shape[:2]) != tuple(weights.shape):
        return None
    return weights


class _CosineDistance(torch.autograd.Function):
    """Per-row ``1 - cos(sparse, dense)`` over the last dimension, computed in float32 (or wider), that saves for
    backward only its two inputs (the dense target in the cache's dtype, the sparse output by
    reference) and three per-row numbers.

    Why not ``F.cosine_similarity``: it saves a float32 normalized copy of each input, so a joint heal
    of a 30-block language model kept two extra copies of every block output until backward (about
    0.3 GB each at 8 x 512 tokens of SmolLM2); here the full-size temporaries live one block at a time.
    Matches ``1 - F.cosine_similarity(sparse, dense, eps=eps)`` to float tolerance.
    """

    @staticmethod
    def forward(ctx, sparse: torch.Tensor, dense: torch.Tensor, eps: float) -> torch.Tensor:
        compute = torch.promote_types(torch.promote_types(sparse.dtype, dense.dtype), torch.float32)
        s, d = sparse.to(compute), dense.to(compute)
        norm_s, norm_d = s.norm(dim=-1).clamp_min(eps), d.norm(dim=-1).clamp_min(eps)
        cos = (s * d).sum(-1) / (norm_s * norm_d)
        ctx.save_for_backward(sparse, dense, norm_s, norm_d, cos)
        return (1.0 - cos).to(torch.promote_types(sparse.dtype, dense.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sparse, dense, norm_s, norm_d, cos = ctx.saved_tensors
        g = grad.to(cos.dtype).unsqueeze(-1)
        ns, nd, c = norm_s.unsqueeze(-1), norm_d.unsqueeze(-1), cos.unsqueeze(-1)

        def against(x: torch.Tensor, nx: torch.Tensor, y: torch.Tensor, ny: torch.Tensor) -> torch.Tensor:
            # d(1 - cos)/dx = -(y / (|x||y|) - cos * x / |x|^2)
            return (g * (c * x.to(c.dtype) / nx - y.to(c.dtype) / ny) / nx).to(x.dtype)

        grad_sparse = against(sparse, ns, dense, nd) if ctx.needs_input_grad[0] else None
        grad_dense = against(dense, nd, sparse, ns) if ctx.needs_input_grad[1] else None
        return grad_sparse, grad_dense, None


def cosine_distance(sparse: torch.Tensor, dense: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of (1 - cosine similarity).

    Token sequences (3-D) compare each token's channel vector (every real token, CLS included;
    padding positions with weight 0 do not count); feature maps (4-D) compare each sample's
    flattened C*H*W map; 2-D compares rows. The dense target may come in the cache's compact dtype:
    it is read in float32 one block at a time (``_CosineDistance``).
    """
    if sparse.dim() >= 4:
        sparse, dense = sparse.flatten(1), dense.flatten(1)
    distance = _CosineDistance.apply(sparse, dense, 1e-8)
    return weighted_mean(distance, _position_weights(distance, weights))


def starfish_loss(sparse: Signals, dense: Signals | None, labels, config) -> torch.Tensor:
    """Mean over blocks (equal weights) of the block's mean cosine distance to the dense output."""
    assert dense is not None
    terms = [cosine_distance(s, d, sparse.weights) for s, d in zip(sparse.blocks, dense.blocks)]
    return torch.stack(terms).mean()


register_objective(
    Objective(
        "starfish",
        starfish_loss,
        needs_blocks=True,
        needs_logits=False,
        saved_block_copies=0,
        description="per-block 1 - cosine alignment with the dense model's block outputs (label-free)",
    )
)


def kd_loss(sparse: Signals, dense: Signals | None, labels, config) -> torch.Tensor:
    """Hinton distillation: T^2 * KL(softmax(dense/T) || softmax(sparse/T)), averaged over images
    (or over the real token positions when logits are (N, L, V), as for language models).

    The T^2 factor keeps gradient magnitudes comparable across temperatures. When both signals carry
    the final hidden state and head, the vocabulary is handled in chunks of tokens (``heal.vocab``).
    """
    assert dense is not None
    t = float(getattr(config, "temperature", 1.0))
    if sparse.hidden is not None and dense.hidden is not None and sparse.head is not None and dense.head is not None:
        from starfish.heal.vocab import chunked_kl

        per_position = chunked_kl(sparse.hidden, dense.hidden, sparse.head, dense.head, t, dtype=sparse.head_dtype)
        return weighted_mean(per_position, _position_weights(per_position, sparse.weights)) * (t * t)
    assert sparse.logits is not None and dense.logits is not None
    log_q = F.log_softmax(sparse.logits / t, dim=-1)
    log_p = F.log_softmax(dense.logits.to(sparse.logits.dtype) / t, dim=-1)
    per_position = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    return weighted_mean(per_position, _position_weights(per_position, sparse.weights)) * (t * t)


def finetune_loss(sparse: Signals, dense: Signals | None, labels, config) -> torch.Tensor:
    """Plain cross-entropy with the calibration labels: the supervised reference point."""
    assert labels is not None and sparse.logits is not None
    if sparse.logits.dim() != 2:
        raise StarfishError(
            "the finetune healer works on image classifiers only (one label per sample); "
            "heal language models with --healer starfish, nmse or kd."
        )
    return F.cross_entropy(sparse.logits, labels)


def normalized_mse(sparse: torch.Tensor, dense: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """||sparse - dense||^2 / ||dense||^2 over the batch (real token positions only when weighted):
    MSE that ignores each block's scale."""
    dense = dense.to(sparse.dtype)
    error, energy = (sparse - dense).pow(2), dense.pow(2)
    weights = _position_weights(error, weights)
    if weights is not None:
        shape = (*weights.shape, *([1] * (error.dim() - 2)))
        error, energy = error * weights.reshape(shape).to(error.dtype), energy * weights.reshape(shape).to(error.dtype)
    return error.sum() / energy.sum().clamp_min(1e-12)


def nmse_loss(sparse: Signals, dense: Signals | None, labels, config) -> torch.Tensor:
    """Sum over blocks of the normalized MSE to the dense block output (global activation matching)."""
    assert dense is not None
    return torch.stack([normalized_mse(s, d, sparse.weights) for s, d in zip(sparse.blocks, dense.blocks)]).sum()


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
        needs_logits=False,
        saved_block_copies=1,  # the difference (sparse - dense)
        description="per-block output MSE normalized by the dense output's energy, summed over blocks (label-free)",
    )
)


register_objective(
    Objective(
        "starfish_norm",
        starfish_loss,
        needs_blocks=True,
        needs_logits=False,
        reads="norm",
        saved_block_copies=0,
        description="per-block 1 - cosine on what the next layer reads: the states after its input norm "
        "(the final norm for the last block), so a few outlier channels do not decide the loss (label-free)",
    )
)


def starfish_kd_loss(sparse: Signals, dense: Signals | None, labels, config) -> torch.Tensor:
    """The starfish_norm term plus ``config.kd_weight`` x the kd term (next-token KL, chunked over the
    vocabulary, padding ignored): the feature term keeps every block close, the KL the predictions."""
    weight = getattr(config, "kd_weight", None)
    if weight is None:
        raise StarfishError("starfish_kd needs a KL weight; pass --kd-weight or let healing settle it on the first batch.")
    return starfish_loss(sparse, dense, labels, config) + float(weight) * kd_loss(sparse, dense, labels, config)


def balance_kd(sparse: Signals, dense: Signals, config):
    """Automatic balance of starfish_kd (``kd_weight`` None): the KL weight that makes both terms
    equal on the first calibration batch before any update (block term / KL term, 1 when either is
    0), then fixed for the whole run so the loss stays comparable across steps (held-out stopping,
    divergence guard). An explicit ``kd_weight`` is kept."""
    from dataclasses import replace

    if getattr(config, "kd_weight", None) is not None:
        return config
    block, kl = float(starfish_loss(sparse, dense, None, config)), float(kd_loss(sparse, dense, None, config))
    return replace(config, kd_weight=block / kl if block > 0 and kl > 0 else 1.0)


register_objective(
    Objective(
        "starfish_kd",
        starfish_kd_loss,
        needs_blocks=True,
        reads="norm",
        settle=balance_kd,
        saved_block_copies=0,
        description="starfish_norm plus next-token KL, the KL weighted so both terms start equal (or --kd-weight) (label-free)",
    )
)
