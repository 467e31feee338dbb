"""Relative Repairability (RR): how much of a layer's pruning damage variance matching undoes.

For each prunable layer alone: prune it (magnitude, at the given sparsity), compare its output
with the dense output on unlabeled calibration images (raw distortion), apply the per-channel
variance-matching correction, compare again (residual distortion). RR = residual / raw:
0 = fully repairable, 1 = the repair does nothing, > 1 = the repair amplifies the damage.
Both distortions are normalised by the dense output's energy. Everything comes from per-channel
moments gathered in one forward pass of the dense model (block by block where the blocks form a
chain, ``starfish.nn.sequential.observe``), so no activations are stored. Padding tokens never count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from starfish.distributed.statistics import sum_pair_moments
from starfish.nn.layerops import channel_axis, channels_last_2d, layer_output, real_rows
from starfish.pruning.masking import lowest_k_mask
from starfish.repair.moments import PairMoments, match_scale
from starfish.nn.sequential import observe
from starfish.nn.structure import Target

RAW_FLOOR = 1e-10  # below this relative distortion a layer counts as undamaged: RR is not defined


@torch.no_grad()
def measure_rr(
    model: nn.Module,
    targets: list[Target],
    calibration: object,
    sparsity: float,
    shrinkage: float = 0.0,
    batch_size: int = 64,
    **_: object,
) -> list[dict]:
    """One row per target: layer, params, raw, residual, rr (None when raw ~ 0), status."""
    params = dict(model.named_parameters())
    pruned_weight = {}
    for t in targets:
        w = params[t.name].detach()
        keep = lowest_k_mask(w.abs().cpu(), int(round(sparsity * w.numel()))).to(w.device)
        pruned_weight[t.name] = w * keep
    pairs = {t.name: PairMoments.empty() for t in targets}

    def visit(t: Target, module: nn.Module, x: torch.Tensor, weights: torch.Tensor | None) -> None:
        axis = channel_axis(module)
        dense = real_rows(channels_last_2d(layer_output(module, t, x, params[t.name]), axis), x, weights)
        pruned = real_rows(channels_last_2d(layer_output(module, t, x, pruned_weight[t.name]), axis), x, weights)
        pairs[t.name].add(dense, pruned)

    observe(model, targets, calibration, batch_size, visit)
    rows = []
    for t in targets:
        pm = pairs[t.name]
        sum_pair_moments(pm)  # each rank measured its share of the calibration set
        energy = max(pm.energy(), 1e-300)
        raw = pm.raw_error() / energy
        residual = pm.corrected_error(match_scale(pm.d.std, pm.p.std, shrinkage)) / energy
        if raw < RAW_FLOOR:
            rr, status = None, "undamaged (raw distortion ~0; RR undefined)"
        else:
            rr = residual / raw
            status = "repair amplifies damage" if rr > 1 else "repairable"
        rows.append({"layer": t.name, "params": params[t.name].numel(), "raw": raw, "residual": residual, "rr": rr, "status": status})
    return rows


def rr_factors(rows: list[dict], floor: float = 0.05, ceiling: float = 20.0) -> dict[str, float]:
    """Per-layer multipliers for LAMP scores in the ``rr`` allocation: the layer's RR, clipped.

    The rule: LAMP's score estimates how much a weight's removal distorts its layer's output
    relative to what survives, i.e. *raw* distortion. After variance matching, what is left of a
    layer's distortion is about RR x raw. Multiplying a layer's LAMP scores by its RR therefore
    ranks weights by the distortion their removal leaves *after the label-free repair*, and one
    global threshold then spends the budget where damage is repairable (low RR loses more) and
    protects layers whose damage the repair cannot undo or amplifies (RR near or above 1).
    RR is clipped to [floor, ceiling] so that no layer is emptied or frozen by one noisy estimate;
    an undamaged layer (RR undefined) gets the median factor.
    """
    values = [r["rr"] for r in rows if r["rr"] is not None and math.isfinite(r["rr"])]
    median = sorted(values)[len(values) // 2] if values else 1.0
    out = {}
    for r in rows:
        v = r["rr"] if r["rr"] is not None and math.isfinite(r["rr"]) else median
        out[r["layer"]] = min(ceiling, max(floor, v))
    return out
