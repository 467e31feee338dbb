"""``--distributed fsdp`` in a run and in a compare grid: what FSDP2 changes in the orchestrations
(``experiments.run``, ``compare.compare``).

* Before the group exists, ``check_fsdp_run`` refuses what sharded weights cannot do (block-wise
  healing, fp16 loss scaling, the healing checkpoints) with one line each.
* Calibration, pruning and repair run on full, replicated models exactly as under DDP (disjoint
  statistics slices, sums all-reduced), so the masks are one process's masks. Then, in a run,
  ``shard_for_healing`` shards BOTH models with FSDP2 (``fsdp.shard_model``: one unit per block
  plus the root), before healing, the alignment probe and the final scoring: from here on every
  rank holds 1/N of each model. The CPU copies of earlier states kept for the final scoring
  (``states.SavedState``) keep only this rank's part too.
* In a compare grid the dense teacher stays full on every rank: every grid point is pruned from
  it (pruning and repair need the whole weights, and its calibration statistics are all-reduced
  as under DDP). ``shard_student`` shards each grid point's student just before its healing
  (after its repair); it stays sharded for its scoring, alignment and mask check and is freed with
  the grid point. Healing takes a sharded student and a plain teacher: the teacher only runs
  forward passes on this rank's share of each batch, which needs no collective.
* Healing splits each global batch once (``ddp.DataParallelStep``, lockstep: every rank runs
  every forward); FSDP2 reduce-scatters the gradients.
* Evaluation: each rank scores every N-th sample and shorter shares are padded with empty batches
  (``shares.lockstep_batches``), so every rank makes the same forward calls, each of which gathers
  the units; the tallies are summed over the ranks as under DDP.
* Writing: ``gathered`` rebuilds a plain module with the full weights from a weightless copy taken
  before sharding (``meta`` device) and the parameters gathered one at a time (a collective), on
  rank 0 only; ``plain_copy`` does the same on every rank where a full replica is needed (the
  BatchNorm-re-estimated dense control of vision runs).
"""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Iterable

import torch
from torch import nn

from starfish.distributed.context import current
from starfish.errors import StarfishError
from starfish.masks import is_sharded, local_view

FSDP_JOBS = ("run", "compare")

# sharded module -> its weightless (meta) copy from before sharding; dies with the module
_SKELETONS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def fsdp_active() -> bool:
    ctx = current()
    return ctx is not None and ctx.mode == "fsdp"


def check_fsdp_run(config, job: str = "run") -> None:
    """What ``--distributed fsdp`` cannot do, refused before the process group exists. Healing
    checkpoints hold whole weights and optimizer states, which rank 0 alone does not have: the
    default (``--checkpoint-every auto``) turns them off, an explicit request is refused."""
    from starfish.distributed.fsdp import check_fsdp_scope

    if job not in FSDP_JOBS:
        raise StarfishError(f"--distributed fsdp works with 'starfish run' and 'starfish compare'; use --distributed ddp for '{job}'.")
    check_fsdp_scope(config.heal.scope)
    if config.heal.precision == "fp16":
        raise StarfishError("--precision fp16 needs a loss scaler that sharded weights do not support; use --precision bf16 or fp32 with --distributed fsdp.")
    if getattr(config, "dtype", None) == "float16":  # shards are healed in their own dtype: float16 steps overflow
        raise StarfishError("--distributed fsdp heals the shards in the dtype they were loaded in, and float16 steps overflow; load in bfloat16 or float32 (--dtype).")
    if config.resume or config.checkpoint_every not in ("auto", 0):
        raise StarfishError(
            "healing checkpoints (--checkpoint-every, --resume) are not available with --distributed fsdp "
            "(each rank holds a shard of the weights); drop them, or use --distributed ddp."
        )
    if getattr(config, "pipeline", "fixed") == "auto":
        raise StarfishError("--pipeline auto probes whole, unsharded candidates; choose with --distributed ddp (or one process), then run the chosen pipeline with --distributed fsdp.")
    config.checkpoint_every = 0  # "auto" under fsdp: no checkpoints (not part of config.json)


def shard_for_healing(
    dense: nn.Module, sparse: nn.Module, block_pattern: str | None, saved_states: Iterable = (),
) -> bool:
    """Under ``--distributed fsdp``: shard ``dense`` and ``sparse`` in place (one FSDP2 unit per block
    plus the root) and cut the ``saved_states`` down to this rank's part; a no-op otherwise.
    Returns whether the models are sharded now. Collective: every rank calls it at the same point."""
    if not fsdp_active():
        return False
    mesh, blocks = _plan_units(dense, block_pattern)
    for model in (dense, sparse):
        _shard(model, blocks, mesh)
    for state in saved_states:
        state.keep_local(sparse)
    return True


def shard_student(sparse: nn.Module, block_pattern: str | None) -> bool:
    """Under ``--distributed fsdp``: shard only ``sparse`` in place (a compare grid point's student,
    just before healing); its dense teacher stays full on every rank. A no-op otherwise. Returns
    whether it is sharded now. Collective: every rank calls it at the same point. The student
    is freed once dropped (``collect_dropped``)."""
    if not fsdp_active():
        return False
    mesh, blocks = _plan_units(sparse, block_pattern)
    _shard(sparse, blocks, mesh)
    return True


def collect_dropped() -> None:
    """Under ``--distributed fsdp``: free the sharded students a compare grid has dropped, before the
    next grid point. FSDP2's hooks and states refer back to their module (reference cycles), so a
    sharded model whose last name is gone waits for a garbage collection; a no-op otherwise."""
    if fsdp_active():
        gc.collect()


def _plan_units(model: nn.Module, block_pattern: str | None) -> tuple[object, list[str]]:
    """The device mesh over every rank and the blocks that become FSDP2 units."""
    from starfish.distributed.fsdp import fsdp_mesh
    from starfish.nn.structure import find_blocks

    return fsdp_mesh(), [name for name, _ in find_blocks(model, block_pattern)]


def _shard(model: nn.Module, blocks: list[str], mesh) -> None:
    from starfish.distributed.fsdp import shard_model

    _SKELETONS[model] = _weightless_copy(model)
    shard_model(model, blocks, mesh)  # gathered in the loaded dtype: --precision acts through autocast, as in one process


def _weightless_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters live on the ``meta`` device (no memory); buffers are
    copied (small: BatchNorm statistics, rotary frequencies) and refreshed when the copy is filled."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def _filled(model: nn.Module, keep: bool) -> nn.Module | None:
    """A plain module with ``model``'s current full weights (kept where ``keep``; None elsewhere).

    Collective over the ranks: each parameter is gathered in turn, in the same order on every rank
    (``named_parameters`` visits a tied parameter once, so ties survive)."""
    skeleton = _SKELETONS.get(model)
    if skeleton is None:
        raise StarfishError("this model was not sharded by starfish.distributed.sharding.shard_for_healing.")
    full: dict[int, nn.Parameter] = {}
    shells = dict(skeleton.named_parameters())
    for name, p in model.named_parameters():
        value = p.full_tensor() if is_sharded(p) else p.detach()
        if keep:
            full[id(shells[name])] = nn.Parameter(value.detach().to("cpu", copy=True), requires_grad=False)
    if not keep:
        return None
    plain = copy.deepcopy(skeleton, full)  # the shells replaced by the gathered parameters
    live_buffers = dict(model.named_buffers())
    for name, buffer in plain.named_buffers():
        buffer.copy_(live_buffers[name].detach().cpu())
    return plain


def gathered(model: nn.Module) -> nn.Module | None:
    """The model to write: ``model`` itself when it is not sharded; under FSDP a plain copy with the
    full weights on the writing rank (rank 0) and None on the others. Collective under FSDP."""
    if model not in _SKELETONS:
        return model
    ctx = current()
    return _filled(model, keep=ctx is None or ctx.is_writer)


def plain_copy(model: nn.Module) -> nn.Module:
    """An independent, unsharded copy of ``model`` on every rank (``copy.deepcopy`` when it is not
    sharded). Collective under FSDP."""
    if model not in _SKELETONS:
        return copy.deepcopy(model)
    plain = _filled(model, keep=True)
    assert plain is not None
    return plain.to(local_view(next(model.parameters())).device)

