"""The single verb: ``prune(model, config)`` allocates, scores, builds masks and zeroes weights.

Order of work: the allocation fixes how many weights each layer loses (from the dense weights);
then each layer's pruner picks which ones. Score-based pruners see statistics of the dense
model's inputs (one pass); SparseGPT runs layer by layer in forward order, each layer seeing the
inputs produced by the already pruned and reconstructed layers before it.
"""

from __future__ import annotations

import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.layerops import forward_order, input_matrix, watch
from starfish.masks import Masks
from starfish.pruning.allocation import AllocationContext, allocate
from starfish.pruning.config import PruneConfig
from starfish.pruning.masking import lowest_k_mask, mask_from_scores, parse_pattern  # noqa: F401 (re-exported)
from starfish.pruning.pruners import Pruner, get_pruner
from starfish.pruning.sparsegpt import sparsegpt_layer
from starfish.structure import Target, prunable_targets


def input_statistics(
    model: nn.Module, targets: list[Target], calibration: torch.Tensor, kind: str, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Per target: sum of squares per input feature (``norms``) or the Gram matrix X^T X (``gram``)."""
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


def _sparsegpt(model: nn.Module, config: PruneConfig, targets: list[Target], counts: dict[str, int], calibration: torch.Tensor) -> Masks:
    masks = Masks()
    pattern = parse_pattern(config.pattern)
    ordered = forward_order(model, targets, calibration)
    params = dict(model.named_parameters())
    for j, target in enumerate(ordered):
        gram = input_statistics_one(model, ordered, j, calibration)
        weight = params[target.name]
        new, keep = sparsegpt_layer(weight.detach().cpu(), gram, counts[target.name], pattern, config.blocksize, config.damp)
        weight.data.copy_(new.to(weight.device, weight.dtype))
        masks[target.name] = keep
    return Masks({t.name: masks[t.name] for t in targets})  # the caller's target order


def input_statistics_one(model: nn.Module, ordered: list[Target], j: int, calibration: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Gram matrix of target ``j``'s inputs, stopping each forward pass as soon as it is seen."""
    acc: list[torch.Tensor] = []

    def visit(i: int, module: nn.Module, x: torch.Tensor) -> None:
        if i == j:
            cols = input_matrix(module, x.detach()).double()
            acc.append(cols.T @ cols)

    watch(model, ordered, calibration, visit, batch_size, stop_after=j)
    return torch.stack(acc).sum(0).cpu()


def prune(
    model: nn.Module,
    config: PruneConfig | float,
    seed: int = 0,
    calibration: torch.Tensor | None = None,
) -> Masks:
    """Prune ``model`` in place and return its masks. Accepts a sparsity as a shortcut.

    ``calibration`` (a tensor of preprocessed images) is needed by the ``wanda`` and ``sparsegpt``
    pruners and by the ``rr`` allocation; magnitude/random with uniform/global/erk/lamp ignore it.
    """
    return prune_with_notes(model, config, seed, calibration)[0]


@torch.no_grad()
def prune_with_notes(
    model: nn.Module,
    config: PruneConfig | float,
    seed: int = 0,
    calibration: torch.Tensor | None = None,
) -> tuple[Masks, dict]:
    """``prune``, plus what the allocation measured on the way (e.g. the RR table of ``rr``)."""
    if not isinstance(config, PruneConfig):
        config = PruneConfig(sparsity=float(config))
    config.validate()
    pruner: Pruner = get_pruner(config.pruner)
    if (pruner.needs_calibration or config.allocation == "rr") and calibration is None:
        raise StarfishError(
            f"pruner '{config.pruner}' with allocation '{config.allocation}' needs calibration images; pass --calib DIR."
        )
    targets = prunable_targets(model, config.include, config.exclude, config.blocks)
    params = dict(model.named_parameters())
    counts, notes = _counts(config, targets, params, model, calibration)
    if pruner.reconstructs:
        masks = _sparsegpt(model, config, targets, counts, calibration)
    else:
        stats = input_statistics(model, targets, calibration, pruner.statistics) if pruner.statistics else {}
        generator = torch.Generator().manual_seed(seed)
        pattern = parse_pattern(config.pattern)
        masks = Masks()
        for t in targets:
            scores = pruner.score(params[t.name].detach().cpu(), generator, stats.get(t.name))
            masks[t.name] = mask_from_scores(scores, counts[t.name], pruner.group, pattern)
    masks.apply_(model)
    return masks, notes
