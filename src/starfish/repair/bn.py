"""BatchNorm recalibration: re-estimate running statistics of the pruned model on calibration data.

Pruning shifts every channel's mean and variance; BatchNorm layers still normalise with the dense
model's statistics. A forward-only pass with cumulative averaging (momentum None) fixes that.
"""

from __future__ import annotations

import torch
from torch import nn

from starfish.nn.batch import batch_len, calibration_set, call_model, iter_batches, model_device, to_device
from starfish.distributed.context import sum_floats
from starfish.distributed.statistics import merge_batchnorm_statistics
from starfish.nn.layerops import no_fastpath

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calibration: object, batch_size: int = 100) -> dict:
    """One forward pass per calibration batch (a mapping or an image tensor), every BatchNorm
    averaging its batch statistics over all of them.

    This is already O(blocks) work, so it does not need the block-by-block walk; it stays a
    whole-model pass because each BatchNorm must see its inputs normalised the way training did.
    """
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
    data = calibration_set(calibration)
    try:
        with no_fastpath():
            for batch in iter_batches(data, batch_size):
                call_model(model, to_device(batch, device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    merge_batchnorm_statistics(bns)  # each rank averaged over its share's batches
    return {"batchnorm_layers": len(bns), "samples": int(sum_floats(batch_len(data))[0])}
