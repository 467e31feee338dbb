"""All-reducing the calibration statistics that pruners and repairs accumulate on their share.

Every statistic starfish gathers on calibration data is a sum over samples (Wanda's per-feature
sums of squares, SparseGPT's Gram matrices times their sample counts, first/second/cross moments
of layer outputs) or, for BatchNorm re-estimation, an average of per-batch statistics; summing
them over ranks (float64 where the consumer accumulates in float64) gives what one process
computes on the whole calibration set. Without a process group every function is a no-op.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from starfish.distributed.context import current, sum_, sum_floats, sum_tensors


def active() -> bool:
    ctx = current()
    return ctx is not None and ctx.world_size > 1


def sum_named(stats: dict[str, torch.Tensor], names: Iterable[str]) -> None:
    """Sum ``stats[name]`` over ranks in place for each of ``names`` (same names on every rank)."""
    if active():
        sum_tensors(stats[name] for name in names)


def sum_moments(moments) -> None:
    """A ``repair.moments.Moments`` (n, s1, s2) summed over ranks in place."""
    if not active():
        return
    moments.n = sum_floats(moments.n)[0]
    sum_tensors([moments.s1, moments.s2])


def sum_pair_moments(pair) -> None:
    """A ``repair.moments.PairMoments`` (dense, pruned and cross moments) summed over ranks."""
    if not active():
        return
    sum_moments(pair.d)
    sum_moments(pair.p)
    sum_(pair.cross)


@torch.no_grad()
def merge_batchnorm_statistics(bns: list[nn.Module]) -> None:
    """BatchNorm running statistics re-estimated with cumulative averaging on each rank's batches:
    the average over all ranks' batches (each rank weighted by its batch count), on every rank."""
    if not active():
        return
    for m in bns:
        batches = float(m.num_batches_tracked)
        total = sum_floats(batches)[0]
        stats = [m.running_mean, m.running_var]
        for s in stats:
            s.mul_(batches)
        sum_tensors(stats)
        for s in stats:
            s.div_(max(total, 1.0))
        m.num_batches_tracked.fill_(int(total))
