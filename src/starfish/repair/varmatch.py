"""Channelwise variance matching: give every pruned layer's output the dense output's statistics.

Layer by layer in forward order, each output channel c of the pruned layer is mapped
y -> a_c (y - mean_p) + mean_d with a_c = std_d / std_p (optionally shrunk, see ``match_scale``),
measured on calibration images with every earlier correction already in place. The map is folded
into existing parameters, so no module is added and masked weights stay exactly zero:

- a layer with a bias: its weight row scales by a_c (zeros stay zero), its bias absorbs the shift;
- a bias-free conv feeding a BatchNorm: the BatchNorm is re-based on the pruned output (its running
  mean and variance become the pruned channel's own, as a recalibration would set them) and the
  rest of the map goes into its affine (gamma, beta). In eval mode this is the same function as
  folding the whole map into gamma/beta against the dense running statistics, but it is the only
  placement that survives what comes next: a BatchNorm recalibration re-estimates the same
  statistics (a no-op), and healing with BatchNorm in train mode (batch statistics) keeps the
  correction. A map folded against the *dense* statistics would be applied twice there (the batch
  statistics already normalise the pruned output, then gamma scales by std_d/std_p again), and a
  map folded into the conv weight would be undone by any re-normalisation;
- a bias-free layer without a BatchNorm after it: only the scale is folded (reported).
"""

from __future__ import annotations

import torch
from torch import nn

from starfish.layerops import channel_axis, channels_last_2d, forward_order, layer_output, watch
from starfish.masks import Masks
from starfish.repair.bn import BN_TYPES
from starfish.repair.moments import Moments, match_scale
from starfish.structure import Target, all_weights


def masked_targets(model: nn.Module, masks: Masks) -> list[Target]:
    return [t for t in all_weights(model) if t.name in masks]


def output_moments(model: nn.Module, targets: list[Target], calibration: torch.Tensor, only: int | None = None, batch_size: int = 64) -> dict[str, Moments]:
    """Per-channel moments of each target's own output (or of target ``only``, stopping there)."""
    acc: dict[str, Moments] = {}
    params = dict(model.named_parameters())

    def visit(i: int, module: nn.Module, x: torch.Tensor) -> None:
        if only is not None and i != only:
            return
        t = targets[i]
        y = layer_output(module, t, x, params[t.name])
        acc.setdefault(t.name, Moments()).add(channels_last_2d(y, channel_axis(module)))

    watch(model, targets, calibration, visit, batch_size, stop_after=only)
    return acc


def following_batchnorm(model: nn.Module, targets: list[Target], sample: torch.Tensor) -> dict[str, str]:
    """Target name -> name of the BatchNorm that directly consumes its output (same tensor object)."""
    names = {id(m): n for n, m in model.named_modules()}
    last_out: dict[int, str] = {}
    found: dict[str, str] = {}
    handles = []
    for t in targets:
        module = t.module(model)
        if isinstance(module, nn.MultiheadAttention):
            continue

        def out_hook(mod, args, out, t=t):
            last_out[id(out)] = t.name

        handles.append(module.register_forward_hook(out_hook))
    for m in model.modules():
        if isinstance(m, BN_TYPES):

            def bn_hook(mod, args):
                owner = last_out.get(id(args[0]))
                if owner is not None:
                    found.setdefault(owner, names[id(mod)])

            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        watch(model, [], sample[:2], lambda *a: None, batch_size=2)
    finally:
        for h in handles:
            h.remove()
    return found


def _rebase_batchnorm(bn: nn.Module, dense_bn: nn.Module, scale: torch.Tensor, shift: torch.Tensor, pruned: Moments) -> None:
    """Make ``bn`` compute f(y) = BN_dense(scale*y + shift) with running stats = the pruned moments.

    The dense model's BatchNorm is the reference (not ``bn``'s current state, which an earlier
    recalibration or repair may have changed), so the result does not depend on what ran before.
    With the dense BatchNorm's s = sqrt(running_var + eps): f(y) = gamma*(scale*y + shift - rm)/s + beta.
    Re-based on the pruned moments (mean_p, var_p): f(y) = gamma'*(y - mean_p)/s' + beta',
    with s' = sqrt(var_p + eps),
    gamma' = gamma*scale*s'/s and beta' = f(mean_p). Identical in eval mode; and since the running
    statistics now are the pruned output's own, batch statistics (train mode) or a recalibration
    reproduce them instead of stacking a second normalisation on top of the correction.
    """
    s = (dense_bn.running_var.double() + dense_bn.eps).sqrt()
    rm = dense_bn.running_mean.double()
    gamma, beta = dense_bn.weight.double(), dense_bn.bias.double()
    s_new = (pruned.var + bn.eps).sqrt()
    new_gamma = gamma * scale * s_new / s
    new_beta = gamma * (scale * pruned.mean + shift - rm) / s + beta
    bn.weight.copy_(new_gamma.to(bn.weight))
    bn.bias.copy_(new_beta.to(bn.bias))
    bn.running_mean.copy_(pruned.mean.to(bn.running_mean))
    bn.running_var.copy_(pruned.var.to(bn.running_var))


def _fold(model: nn.Module, dense: nn.Module, target: Target, bn_name: str | None, scale: torch.Tensor, shift: torch.Tensor, pruned: Moments) -> str:
    """Fold y -> scale*y + shift (per output channel) into parameters; returns where it went."""
    module = target.module(model)
    weight = getattr(module, target.param_name)
    view = (-1,) + (1,) * (weight.dim() - 1)
    bias = module.in_proj_bias if isinstance(module, nn.MultiheadAttention) else getattr(module, "bias", None)
    if bias is not None:
        if isinstance(module, nn.MultiheadAttention) and target.param_name != "in_proj_weight":
            d = module.embed_dim
            i = ("q_proj_weight", "k_proj_weight", "v_proj_weight").index(target.param_name)
            bias = bias[i * d : (i + 1) * d]
        weight.mul_(scale.to(weight).view(view))
        bias.mul_(scale.to(bias)).add_(shift.to(bias))
        return "bias"
    if bn_name is not None:
        bn = model.get_submodule(bn_name)
        if bn.affine:
            _rebase_batchnorm(bn, dense.get_submodule(bn_name), scale, shift, pruned)
        else:  # no affine to use: scale the weight rows, shift through the running mean
            weight.mul_(scale.to(weight).view(view))
            rm = bn.running_mean.double()
            bn.running_mean.copy_((rm - shift).to(bn.running_mean))
        return "batchnorm"
    weight.mul_(scale.to(weight).view(view))
    return "scale only"


@torch.no_grad()
def variance_match(dense: nn.Module, sparse: nn.Module, masks: Masks, calibration: torch.Tensor, shrinkage: float = 0.0, batch_size: int = 64) -> dict:
    targets = forward_order(sparse, masked_targets(sparse, masks), calibration)
    dense_moments = output_moments(dense, targets, calibration, batch_size=batch_size)
    bn_of = following_batchnorm(sparse, targets, calibration)
    placed: dict[str, int] = {}
    scales: list[float] = []
    for j, t in enumerate(targets):
        pm = output_moments(sparse, targets, calibration, only=j, batch_size=batch_size)[t.name]
        dm = dense_moments[t.name]
        scale = match_scale(dm.std, pm.std, shrinkage)
        shift = dm.mean - scale * pm.mean
        where = _fold(sparse, dense, t, bn_of.get(t.name), scale, shift, pm)
        placed[where] = placed.get(where, 0) + 1
        scales.append(float(scale.median()))
    masks.apply_(sparse)  # a no-op by construction; kept as the contract's guard
    return {"layers": len(targets), "placed": placed, "shrinkage": shrinkage, "median_scale": float(torch.tensor(scales).median()) if scales else None}
