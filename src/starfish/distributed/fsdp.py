"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for healing: shard the models, split each batch
over the ranks, gather the healed weights for writing.

What is sharded: every parameter, its gradient and its optimizer state, split along dim 0 over the
ranks of a 1-D device mesh; each block is its own FSDP unit (gathered for its forward and backward,
freed right after), the root holds the rest (embeddings, head, final norm). Both models are
sharded: the dense teacher only runs forward passes (no gradients, no optimizer state), and
replicating it would cost every rank the full weights that sharding the student saved. The masks
stay full on the host and each rank keeps only its shard of each mask beside the parameter shard
(``starfish.masks``); gradients are masked explicitly after every backward pass because tensor
hooks never fire on FSDP2 parameters, and the masks are re-applied after every optimizer step.

Each global batch (the same permutation on every rank, as in one process) is split over the ranks;
each rank's loss is weighted by its share of the batch (n_rank / n_batch) and FSDP2 reduce-scatters
the *sum* of the gradients (divide factor 1, set by ``shard_model``), which is the gradient of the
global batch mean, also when a batch does not split evenly. This is the convention of the DDP step
(``distributed.ddp``), so either split of the batch works with a model sharded here. Every rank must run
every forward pass of a sharded model (each one all-gathers parameters), so the code that runs on
one rank only (writing outputs) works on gathered full weights (``sharding.gathered``,
``full_state_dict``), never on the sharded model.

The same code runs with gloo on CPUs (the tests) and with NCCL on GPUs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from starfish.errors import StarfishError

# --precision names (heal.precision's fp32/bf16, and the dtype names); fp16 needs a gradient scaler
# that FSDP2's policy does not bring, so it is not offered here
PRECISIONS = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def fsdp_mesh(device_type: str | None = None):
    """A 1-D device mesh over every rank of the default process group (``cpu`` for gloo, else ``cuda``)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available() or not dist.is_initialized():
        raise StarfishError(
            "--distributed fsdp needs a process group; launch with torchrun --nproc-per-node N python -m starfish ..."
        )
    if device_type is None:
        device_type = "cpu" if dist.get_backend() == "gloo" else "cuda"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def mixed_precision(precision: str):
    """FSDP2's policy for ``precision``: bfloat16 gathers and computes in bfloat16 while the sharded
    weights and optimizer state stay in their own dtype and gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision not in PRECISIONS:
        raise StarfishError(f"--precision must be one of {', '.join(PRECISIONS)} with --distributed fsdp; got '{precision}'.")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, block_names: list[str], mesh, precision: str = "fp32") -> nn.Module:
    """Shard ``model`` in place with FSDP2: one unit per block (in ``block_names``), then the root.

    Gradients are summed over the ranks, not averaged (divide factor 1): each rank's loss already
    carries its share of the global batch (``data_parallel_loss``). Every unit, the root included,
    reshards after its forward pass: masks, the divergence guard and
    the optimizer work on the parameter shards, so no parameter may stay gathered once a forward
    pass ends (a no-grad forward, e.g. the target cache, never runs the backward that would free
    them). Parameter names do not change, so masks keyed by name apply as before. Per-block
    gradient checkpointing composes when it wraps each block's ``forward`` (an instance attribute)
    before or after this call: FSDP2's gather and free run in module hooks around that forward and
    before each block's backward, where the recomputation happens.
    """
    from torch.distributed.fsdp import fully_shard

    if not block_names:
        raise StarfishError("FSDP shards the model block by block but no blocks were found; name them with --blocks REGEX.")
    policy = mixed_precision(precision)
    units = [model.get_submodule(name) for name in block_names] + [model]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for unit in units:  # each FSDP module sets its own parameter group only
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum); factor 1: no scaling
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0, on the CPU; an empty dict on every other rank.

    Collective: every rank must call it. Gathers one tensor at a time, so no rank ever holds the
    whole model on the accelerator."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def data_parallel_loss(
    loss_of: Callable[[torch.Tensor], torch.Tensor], group=None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``loss_of`` over global batches, computed on this rank's share of each, for a model sharded
    from Python without a ``torchrun`` launch context (the rank and world come from ``group``).

    The same weighting as the DDP step (``ddp.weighted_share_loss``): gradients FSDP2 sums over the
    ranks are the gradient of the global batch mean, also when the batch does not split evenly; the
    value is the global batch mean (one all-reduce of a scalar). Lockstep: a rank whose share is
    empty still runs one sample with weight 0, since every rank must take part in every gather.
    """
    from starfish.distributed.ddp import weighted_share_loss, with_value
    from starfish.distributed.shares import share_bounds

    world, rank = dist.get_world_size(group), dist.get_rank(group)

    def local_loss(index: torch.Tensor) -> torch.Tensor:
        start, end = share_bounds(index.numel(), rank, world)
        weighted = weighted_share_loss(loss_of, index, index[start:end], lockstep=True)
        total = weighted.detach().float().clone()
        dist.all_reduce(total, group=group)
        return with_value(weighted, total)

    return local_loss


def sharded_loss(loss_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss joint healing of a sharded model trains on. Under a ``torchrun`` launch (an active
    ``DistributedContext``) ``heal.training.train_steps`` already takes this rank's share of every batch
    (``ddp.DataParallelStep``), so ``loss_of`` is returned as it is; splitting twice would train on
    1/N^2 of each batch. Sharded from Python without a context: split here (``data_parallel_loss``)."""
    from starfish.distributed.context import current

    return loss_of if current() is not None else data_parallel_loss(loss_of)


def check_fsdp_scope(scope: str) -> None:
    """FSDP heals jointly: block-wise healing already holds one block at a time and moves blocks
    between devices, which sharded blocks cannot do."""
    if scope != "joint":
        raise StarfishError(
            f"--distributed fsdp heals with --heal-scope joint (block-wise healing already needs the memory of one "
            f"block only); got --heal-scope {scope}."
        )
