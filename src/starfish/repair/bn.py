"""BatchNorm recalibration: re-estimate running statistics of the pruned model on calibration data.

Pruning shifts every channel's mean and variance; BatchNorm layers still normalise with the dense
model's statistics. A forward-only pass with cumulative averaging (momentum None) fixes that.
"""

from __future__ import annotations

import torch
from torch import nn

from starfish.layerops import batches, model_device, no_fastpath

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calibration: torch.Tensor, batch_size: int = 100) -> dict:
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    if not bns:
        return {"batchnorm_layers": 0}
    saved = [(m, m.momentum) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    device = model_device(model)
    try:
        with no_fastpath():
            for x in batches(calibration, batch_size):
                model(x.to(device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return {"batchnorm_layers": len(bns), "images": int(calibration.shape[0])}
