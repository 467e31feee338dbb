"""Which part of the data each rank works on.

* Statistics (pruner inputs, repair moments, BatchNorm re-estimation, RR distortions): every rank
  decodes the same seeded calibration set and takes one contiguous, disjoint slice of it; the
  consumers all-reduce their sums, so the union of the slices is the one-process calibration set.
* Healing: every rank keeps the whole calibration set and takes its slice of every global batch
  (``starfish.distributed.ddp``), so the batches are the one-process batches.
* Evaluation: every rank scores every W-th sample (or window); the tasks all-reduce their tallies.
  Where every forward must be taken by every rank (FSDP), shorter shares are padded with batches
  the tasks run but do not count, so every rank makes the same number of calls.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator

import torch
from torch.utils.data import Dataset, Subset

from starfish.nn.batch import Batch, batch_len, select
from starfish.distributed.context import current
from starfish.errors import StarfishError


def share_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s contiguous slice of ``n`` items (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def statistics_share(calibration: Batch) -> Batch:
    """This rank's disjoint slice of the calibration set (the whole set in one process)."""
    ctx = current()
    if ctx is None or ctx.world_size == 1:
        return calibration
    n = batch_len(calibration)
    if n < ctx.world_size:
        raise StarfishError(
            f"{n} calibration samples cannot be shared among {ctx.world_size} processes; "
            f"raise --calib-size to at least {ctx.world_size} or start fewer processes."
        )
    start, end = share_bounds(n, ctx.rank, ctx.world_size)
    return select(calibration, slice(start, end))


def batch_share(index: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of one global batch of sample indices."""
    ctx = current()
    if ctx is None or ctx.world_size == 1:
        return index
    start, end = share_bounds(index.numel(), ctx.rank, ctx.world_size)
    return index[start:end]


def evaluation_share(dataset: Dataset) -> Dataset:
    """Every W-th evaluation sample, or window of a text, starting at this rank."""
    ctx = current()
    if ctx is None or ctx.world_size == 1:
        return dataset
    n = len(dataset)  # type: ignore[arg-type]
    if n < ctx.world_size:
        raise StarfishError(
            f"{n} evaluation samples cannot be shared among {ctx.world_size} processes; "
            f"raise --eval-size to at least {ctx.world_size} or start fewer processes."
        )
    if hasattr(dataset, "input_ids") and dataclasses.is_dataclass(dataset):  # TextWindows
        return dataclasses.replace(dataset, input_ids=dataset.input_ids[ctx.rank :: ctx.world_size])
    return Subset(dataset, range(ctx.rank, n, ctx.world_size))


class PaddingBatch(dict):
    """A batch that only keeps this rank in step with the others (FSDP): the models run on it, the
    tasks count nothing of it (``is_padding``). One real sample rather than none: not every model
    accepts an empty batch (attention reshapes fail on zero rows)."""


def is_padding(batch: Batch) -> bool:
    return isinstance(batch, PaddingBatch)


def lockstep_batches(batches: Iterable[Batch], total: int, batch_size: int) -> Iterator[Batch]:
    """``batches`` of this rank's evaluation share, then padding batches until this rank has made as
    many calls as the rank with the largest share would; only where the mode needs lockstep forwards."""
    ctx = current()
    if ctx is None or not ctx.lockstep_forward:
        yield from batches
        return
    calls = math.ceil(math.ceil(total / ctx.world_size) / batch_size)
    made, last = 0, None
    for batch in batches:
        made, last = made + 1, batch
        yield batch
    while made < calls and last is not None:
        made += 1
        yield PaddingBatch(select(last, slice(0, 1)))
