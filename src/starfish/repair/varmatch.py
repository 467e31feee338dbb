"""Channelwise variance matching: give every pruned layer's output the dense output's statistics.

Each output channel c of a pruned layer is mapped y -> a_c (y - mean_p) + mean_d with
a_c = std_d / std_p (optionally shrunk, see ``match_scale``), measured on calibration data.

When the blocks form a chain (``starfish.nn.sequential``) the dense and the pruned network are walked
side by side, block by block. One pass of the dense block gives the dense moments of all its
layers (and the order they run in). When the whole calibration set fits in one call (always for
CIFAR-size inputs; ``_one_call_size``), one pass of the pruned block does the rest: each layer's
pre-hook measures its output on the whole set and folds its correction before the layer runs, so
every later layer reads corrected inputs, and the pass's output feeds the next block; two passes
per block in all. Otherwise the pruned block is measured and corrected one group of layers at a
time (layers reading the same input form a group), each with every earlier correction in place, by
a pass that stops right after the group's input is seen, and a last full pass of the corrected
block feeds the next one. The corrections are those of correcting layer by layer over
the whole network (``scheme="layer"``, the default); ``scheme="block"`` measures a block's layers
together before any of its corrections (two passes of the pruned block per batch): cheaper, but
on the CIFAR-10 ViT followed by STARFISH healing it loses 1.3-1.8 points at 50% and 13.6 at 75%
(benchmarks/varmatch_block_scheme.py, results/varmatch_block_scheme.json), so it is not the default. Otherwise (the
whole-model fallback) layers are corrected one by one in forward order at one truncated
whole-model pass per layer. Padding tokens never count.

The map is folded into existing parameters, so no module is added and masked weights stay exactly
zero:

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

from contextlib import contextmanager
from typing import Iterator

from starfish.nn.batch import calibration_set, select
from starfish.distributed.statistics import sum_moments
from starfish.nn.layerops import channel_axis, channels_last_2d, forward_order, layer_output, real_rows, watch
from starfish.masks import Masks
from starfish.repair.bn import BN_TYPES
from starfish.repair.moments import Moments, match_scale
from starfish.errors import StarfishError
from starfish.nn.sequential import InputOrder, Stream, plan_blocks
from starfish.nn.structure import Target, all_weights
from starfish.nn.hooks import hooks


def masked_targets(model: nn.Module, masks: Masks) -> list[Target]:
    return [t for t in all_weights(model) if t.name in masks]


class MomentsOf:
    """A visit for ``watch``/``Stream.run``: per-channel moments of each target's own output."""

    def __init__(self, model: nn.Module) -> None:
        self.params = dict(model.named_parameters())
        self.moments: dict[str, Moments] = {}

    def __call__(self, target: Target, module: nn.Module, x: torch.Tensor, weights: torch.Tensor | None) -> None:
        y = channels_last_2d(layer_output(module, target, x, self.params[target.name]), channel_axis(module))
        self.moments.setdefault(target.name, Moments()).add(real_rows(y, x, weights))


def output_moments(model: nn.Module, targets: list[Target], calibration: object, only: int | None = None, batch_size: int = 64) -> dict[str, Moments]:
    """Per-channel moments of each target's own output (or of target ``only``, stopping there),
    from whole-model passes."""
    acc = MomentsOf(model)

    def visit(i: int, module: nn.Module, x: torch.Tensor, weights: torch.Tensor | None) -> None:
        if only is None or i == only:
            acc(targets[i], module, x, weights)

    watch(model, targets, calibration, visit, batch_size, stop_after=only, weighted=True)
    return acc.moments


@contextmanager
def batchnorm_consumers(model: nn.Module, targets: list[Target], found: dict[str, str]) -> Iterator[None]:
    """While active, record in ``found`` target name -> the BatchNorm that directly consumes its
    output (the same tensor object) in whatever forward passes run."""
    names = {id(m): n for n, m in model.named_modules()}
    last_out: dict[int, str] = {}
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
    with hooks(handles):
        yield


def following_batchnorm(model: nn.Module, targets: list[Target], sample: object) -> dict[str, str]:
    """Target name -> name of the BatchNorm that directly consumes its output (same tensor object)."""
    found: dict[str, str] = {}
    with batchnorm_consumers(model, targets, found):
        watch(model, [], select(calibration_set(sample), slice(0, 2)), lambda *a: None, batch_size=2)
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


class _Corrector:
    """Folds each target's correction and tallies where it went."""

    def __init__(self, dense: nn.Module, sparse: nn.Module, shrinkage: float) -> None:
        self.dense, self.sparse, self.shrinkage = dense, sparse, shrinkage
        self.placed: dict[str, int] = {}
        self.scales: list[float] = []

    def __call__(self, target: Target, dense: Moments, pruned: Moments, bn_name: str | None) -> None:
        sum_moments(dense)  # each rank measured its share of the calibration set
        sum_moments(pruned)
        scale = match_scale(dense.std, pruned.std, self.shrinkage)
        shift = dense.mean - scale * pruned.mean
        where = _fold(self.sparse, self.dense, target, bn_name, scale, shift, pruned)
        self.placed[where] = self.placed.get(where, 0) + 1
        self.scales.append(float(scale.median()))


ONE_CALL_EXPANSION = 16  # bytes of a block's activations per byte of model input, with margin (ResNet/ViT stems)


def _one_call_size(calibration: object, model: nn.Module) -> int | None:
    """The whole calibration set as one call when its block activations fit a quarter of free memory.

    In one call every layer's correction can be folded in its own pre-hook before the next layer
    reads it, with moments over the whole set: the per-layer corrections at one pass of the pruned
    block. Split into several calls, a later call would change what earlier calls measured."""
    from starfish.nn.batch import batch_len, model_device
    from starfish.nn.device import free_device_bytes

    batch = calibration_set(calibration)
    n = batch_len(batch)
    nbytes = sum(v.numel() * v.element_size() for k, v in batch.items() if k != "labels")
    return n if nbytes * ONE_CALL_EXPANSION <= free_device_bytes(model_device(model)) // 4 else None


def _correct_in_pass(sparse: nn.Module, dense_moments: "MomentsOf", bn_of: dict[str, str], correct: _Corrector):
    """A visit that measures each target on the (single) call and folds its correction before the
    layer runs, so every later layer of the block already reads corrected inputs."""
    done: set[str] = set()

    def visit(target: Target, module: nn.Module, x: torch.Tensor, weights: torch.Tensor | None) -> None:
        if target.name in done:  # a module called twice in one block: corrected on its first call
            return
        done.add(target.name)
        measured = MomentsOf(sparse)
        measured(target, module, x, weights)
        correct(target, dense_moments.moments[target.name], measured.moments[target.name], bn_of.get(target.name))

    return visit


def _block_by_block(dense: nn.Module, sparse: nn.Module, stages, calibration: object, batch_size: int, correct: _Corrector, scheme: str) -> str:
    one_call = _one_call_size(calibration, sparse) if scheme == "layer" else None
    dense_stream = Stream.start(dense, stages[0].name, calibration, batch_size)
    sparse_stream = Stream.start(sparse, stages[0].name, calibration, one_call or batch_size)
    bn_of: dict[str, str] = {}
    for stage in stages:
        dense_moments, order = MomentsOf(dense), InputOrder()
        both = lambda *a: (dense_moments(*a), order(*a))  # noqa: E731
        with batchnorm_consumers(dense, stage.targets, bn_of):
            dense_out = dense_stream.run(stage.name, stage.targets, both)
        if one_call:  # one pass of the pruned block measures, corrects and gives the next block its input
            sparse_stream.advance(sparse_stream.run(stage.name, stage.targets, _correct_in_pass(sparse, dense_moments, bn_of, correct)))
            dense_stream.advance(dense_out)
            continue
        groups = order.groups(stage.targets) if scheme == "layer" else [stage.targets]
        for group in groups if stage.targets else []:
            sparse_moments = MomentsOf(sparse)
            sparse_stream.run(stage.name, group, sparse_moments, stop=True)
            for t in group:
                correct(t, dense_moments.moments[t.name], sparse_moments.moments[t.name], bn_of.get(t.name))
        sparse_stream.advance(sparse_stream.run(stage.name))
        dense_stream.advance(dense_out)
    if one_call:
        return "one pass of each pruned block (the whole calibration set in one call)"
    return "one truncated pass of each pruned block per group of layers, then a full pass" if scheme == "layer" else "two passes of each pruned block"


def _layer_by_layer(dense: nn.Module, sparse: nn.Module, targets: list[Target], calibration: object, batch_size: int, correct: _Corrector) -> None:
    targets = forward_order(sparse, targets, calibration)
    dense_moments = output_moments(dense, targets, calibration, batch_size=batch_size)
    bn_of = following_batchnorm(sparse, targets, calibration)
    for j, t in enumerate(targets):
        pruned = output_moments(sparse, targets, calibration, only=j, batch_size=batch_size)[t.name]
        correct(t, dense_moments[t.name], pruned, bn_of.get(t.name))


@torch.no_grad()
def variance_match(
    dense: nn.Module, sparse: nn.Module, masks: Masks, calibration: object, shrinkage: float = 0.0, batch_size: int = 64, scheme: str = "layer"
) -> dict:
    """Correct ``sparse`` in place. ``scheme`` (block-by-block walk only): ``"layer"`` measures each
    layer with every earlier correction in place (one truncated pass of the pruned block per group
    of layers reading the same input, then one full pass); ``"block"`` measures a block's layers
    together (one pass, then one full pass)."""
    if scheme not in ("layer", "block"):
        raise StarfishError(f"varmatch scheme must be 'layer' or 'block'; got '{scheme}'.")
    targets = masked_targets(sparse, masks)
    plan = plan_blocks(sparse, targets, calibration)
    correct = _Corrector(dense, sparse, shrinkage)
    walk = "one truncated whole-model pass per layer"
    if plan.sequential:
        walk = _block_by_block(dense, sparse, plan.stages, calibration, batch_size, correct, scheme)
    else:
        _layer_by_layer(dense, sparse, targets, calibration, batch_size, correct)
    masks.apply_(sparse)  # a no-op by construction; kept as the contract's guard
    scales = correct.scales
    return {
        "layers": len(targets),
        "placed": correct.placed,
        "shrinkage": shrinkage,
        "median_scale": float(torch.tensor(scales).median()) if scales else None,
        "calibration": plan.note,
        "passes": walk,
    }
