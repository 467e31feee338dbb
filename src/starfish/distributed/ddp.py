"""Data-parallel training steps: each rank's share of every global batch, gradients summed.

``heal.training.train_steps`` asks ``data_parallel_step(loss_of, params)`` for its step; in one process
(or under FSDP, which reduces gradients itself) that is a pass-through. Under DDP:

* every rank draws the same permutation, so every global batch (``--batch-size``) is the
  one-process batch; a rank computes the loss on its contiguous part of it, weighted by its
  share of the samples (n_rank / n_batch), so the summed gradient is the gradient of the
  one-process batch mean;
* the loss value every rank sees (the divergence guard's input) is the sum of those weighted
  losses over ranks: the global batch loss, so every rank makes the same stop decisions;
* after ``backward`` the trainable gradients are summed over ranks in buckets, then every rank
  takes the same optimizer step, so the weights stay identical without broadcasting them.

Why explicit bucketed all-reduce rather than ``torch.nn.parallel.DistributedDataParallel``: the
trained module is sometimes one block driven through recorded calls (block-wise healing), the
dense model's stream is read through forward hooks on the sparse model, and only the masked
weights train; DDP's wrapper needs every forward to go through it and all of a module's trainable
parameters to receive gradients, which would change all three call sites. What is lost is the
overlap of communication with the backward pass; on the models starfish heals the all-reduce is a
small part of a step (benchmarks/DISTRIBUTED.md).

BatchNorm in train mode normalises with the statistics of each rank's share of the batch (as
torch DDP does without SyncBatchNorm), and its running statistics are averaged over ranks at the
end (``average_buffers``): the running update is affine with the same coefficients on every rank,
so the average equals running statistics updated with the mean of the per-rank batch statistics.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from starfish.distributed.context import current, sum_, sum_tensors
from starfish.distributed.shares import batch_share


def weighted_share_loss(
    loss_of: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor, local: torch.Tensor, lockstep: bool
) -> torch.Tensor:
    """The loss of this rank's part ``local`` of global batch ``index``, weighted by its share of the
    samples, so gradients summed over the ranks are the gradient of the global batch mean. An empty
    part runs one sample with weight 0 where every rank must join every forward (``lockstep``)."""
    if local.numel() == 0 and lockstep:  # a batch smaller than the group
        return loss_of(index[:1]) * 0.0
    if local.numel() == 0:  # this rank contributes nothing
        return torch.zeros((), dtype=torch.float32, requires_grad=True)
    return loss_of(local) * (local.numel() / index.numel())


def with_value(weighted: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``weighted``'s gradient with the value ``total`` (the global batch loss, summed over the ranks),
    so every rank's divergence guard sees the same loss and they stop together."""
    return weighted + (total.to(weighted.device, weighted.dtype).reshape(()) - weighted.detach())


class DataParallelStep:
    """One rank's part of each optimizer step; the identity in one process.

    ``active``: split every global batch (DDP and FSDP). ``reduces``: sum the gradients here (DDP);
    FSDP reduce-scatters them itself and must sum rather than average (divide factor 1), since the
    loss shares already carry each rank's weight. ``lockstep``: a rank with no samples in a batch
    still runs one forward and backward (weighted 0), because FSDP needs every rank in every call.
    """

    def __init__(
        self, loss_of: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter], active: bool,
        reduces: bool = True, lockstep: bool = False,
    ) -> None:
        self.loss_of = loss_of
        self.params = params
        self.active = active
        self.reduces = reduces
        self.lockstep = lockstep

    def loss(self, index: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate for global batch ``index``: its value is the global batch loss,
        its gradient this rank's weighted share of the global batch gradient."""
        if not self.active:
            return self.loss_of(index)
        weighted = weighted_share_loss(self.loss_of, index, batch_share(index), self.lockstep)
        return with_value(weighted, sum_(weighted.detach().to(torch.float64).reshape(1).cpu()))

    def reduce_gradients(self) -> None:
        """Sum the trainable gradients over ranks (a missing gradient counts as zeros)."""
        if not (self.active and self.reduces):
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        sum_tensors(p.grad for p in self.params)


def data_parallel_step(loss_of: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter]) -> DataParallelStep:
    ctx = current()
    if ctx is None or ctx.world_size == 1:
        return DataParallelStep(loss_of, params, active=False)
    return DataParallelStep(loss_of, params, active=True, reduces=ctx.mode == "ddp", lockstep=ctx.lockstep_forward)


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over ranks."""
    ctx = current()
    if ctx is None or ctx.world_size == 1:
        return
    buffers = [b for _, b in module.named_buffers() if b.is_floating_point()]
    sum_tensors(buffers)
    for b in buffers:
        b.div_(ctx.world_size)
