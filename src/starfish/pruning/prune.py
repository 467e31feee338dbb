"""The single verb: ``prune(model, config)`` allocates, calibrates, compresses and zeroes weights.

Order of work: the allocation fixes how many weights each layer loses (from the dense weights);
then the pruner picks which ones. Pruners that need calibration data are fed block by block
(``starfish.nn.sequential``): one prefix pass per calibration batch, then per block one calibration
pass and, for pruners that rewrite weights (SparseGPT), one pass of the pruned block whose output
the next block calibrates on. Where the blocks do not form a chain or targets lie outside them,
whole-model passes are used instead and the notes say so.
"""

from __future__ import annotations

import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.nn.layerops import forward_order, input_matrix, watch
from starfish.masks import Masks
from starfish.pruning.allocation import AllocationContext, allocate
from starfish.pruning.config import PruneConfig
from starfish.pruning.masking import lowest_k_mask, mask_from_scores, parse_pattern  # noqa: F401 (re-exported)
from starfish.pruning.pruners import Pruner, get_pruner
from starfish.nn.sequential import plan_blocks, walk
from starfish.nn.structure import Target, prunable_targets

BATCH_SIZE = 64  # calibration samples per forward call


def input_statistics(
    model: nn.Module, targets: list[Target], calibration: object, kind: str, batch_size: int = BATCH_SIZE
) -> dict[str, torch.Tensor]:
    """Per target (dense model, one whole-model pass): sum of squares per input feature (``norms``)
    or the Gram matrix X^T X (``gram``), in float64 on the CPU. For tests and diagnostics."""
    acc: dict[str, torch.Tensor] = {}

    def visit(i: int, module: nn.Module, x: torch.Tensor) -> None:
        cols = input_matrix(module, x.detach()).double()
        stat = (cols * cols).sum(0) if kind == "norms" else cols.T @ cols
        name = targets[i].name
        acc[name] = acc[name] + stat if name in acc else stat

    watch(model, targets, calibration, visit, batch_size)
    return {k: v.cpu() for k, v in acc.items()}


def _counts(config: PruneConfig, targets: list[Target], params: dict, model: nn.Module, calibration) -> tuple[dict[str, int], dict]:
    weights = {t.name: params[t.name].detach().cpu() for t in targets}
    pattern = parse_pattern(config.pattern)
    if pattern is not None:  # the pattern fixes every layer's count
        return {k: w.numel() - (w.numel() // pattern[1]) * pattern[0] for k, w in weights.items()}, {}
    context = AllocationContext(model, targets, calibration, {"pruner": "magnitude"})
    counts = allocate(config.allocation, weights, config.sparsity, context)
    return counts, context.notes


class _Compressor:
    """Applies the pruner's ``compress`` to targets and records their masks."""

    def __init__(self, model: nn.Module, pruner: Pruner, counts: dict[str, int], pattern: tuple[int, int] | None) -> None:
        self.params = dict(model.named_parameters())
        self.pruner, self.counts, self.pattern = pruner, counts, pattern
        self.masks = Masks()

    @torch.no_grad()
    def __call__(self, targets: list[Target]) -> None:
        self.pruner.gather_statistics([t.name for t in targets])  # each rank saw its share of the data
        for t in targets:
            weight = self.params[t.name]
            new, keep = self.pruner.compress(t, weight.detach(), self.counts[t.name], self.pattern)
            weight.data.copy_(new.to(weight.device, weight.dtype))
            weight.data.mul_(keep.to(weight.device, weight.dtype))  # exactly zero, whatever compress returned
            self.masks[t.name] = keep.cpu()


def _whole_model(model: nn.Module, pruner: Pruner, targets: list[Target], calibration, compressor: _Compressor) -> None:
    """Fallback: one whole-model pass for statistics of the dense model, or, for a pruner that
    rewrites weights, one (truncated) pass per target in forward order (O(targets x blocks))."""
    if not pruner.reconstructs:
        visit = lambda i, module, x, w: pruner.calibrate(targets[i], module, x, w)  # noqa: E731
        watch(model, targets, calibration, visit, BATCH_SIZE, weighted=True)
        compressor(targets)
        return
    ordered = forward_order(model, targets, calibration)
    for j, target in enumerate(ordered):

        def visit_one(i: int, module: nn.Module, x: torch.Tensor, w: torch.Tensor | None, j: int = j) -> None:
            if i == j:
                pruner.calibrate(ordered[j], module, x, w)

        watch(model, ordered, calibration, visit_one, BATCH_SIZE, stop_after=j, weighted=True)
        compressor([target])


def prune(
    model: nn.Module,
    config: PruneConfig | float,
    seed: int = 0,
    calibration: object = None,
) -> Masks:
    """Prune ``model`` in place and return its masks. Accepts a sparsity as a shortcut.

    ``calibration`` (a batch mapping, or a tensor of preprocessed images) is needed by the
    ``wanda`` and ``sparsegpt`` pruners and by the ``rr`` allocation; magnitude/random with
    uniform/global/erk/lamp ignore it.
    """
    return prune_with_notes(model, config, seed, calibration)[0]


@torch.no_grad()
def prune_with_notes(
    model: nn.Module,
    config: PruneConfig | float,
    seed: int = 0,
    calibration: object = None,
) -> tuple[Masks, dict]:
    """``prune``, plus notes: what the allocation measured (e.g. the RR table of ``rr``) and, under
    ``"calibration"``, whether the pruner was fed block by block or by whole-model passes (and why)."""
    if not isinstance(config, PruneConfig):
        config = PruneConfig(sparsity=float(config))
    config.validate()
    pruner_type = get_pruner(config.pruner)
    if (pruner_type.needs_calibration or config.allocation == "rr") and calibration is None:
        raise StarfishError(
            f"pruner '{config.pruner}' with allocation '{config.allocation}' needs calibration images; pass --calib DIR."
        )
    targets = prunable_targets(model, config.include, config.exclude, config.blocks)
    params = dict(model.named_parameters())
    counts, notes = _counts(config, targets, params, model, calibration)
    pruner = pruner_type(seed=seed, blocksize=config.blocksize, damp=config.damp)
    compressor = _Compressor(model, pruner, counts, parse_pattern(config.pattern))
    if not pruner.needs_calibration:
        compressor(targets)
    else:
        plan = plan_blocks(model, targets, calibration, config.blocks)
        notes["calibration"] = plan.note
        if plan.sequential:
            change = lambda stage: compressor(stage.targets)  # noqa: E731
            walk(model, plan, calibration, BATCH_SIZE, pruner.calibrate, change, propagate_changed=pruner.reconstructs)
        else:
            _whole_model(model, pruner, targets, calibration, compressor)
    masks = Masks({t.name: compressor.masks[t.name] for t in targets})  # the caller's target order
    masks.apply_(model)
    return masks, notes
