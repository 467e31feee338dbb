"""``heal``: train the surviving weights of a pruned model against the dense one.

Two scopes share one per-step recipe (``heal.training``): *joint* (the published STARFISH recipe:
one backward through the whole network per step, dense targets cached once) and *blockwise*
(``heal.blockwise``: one block at a time, memory of one block). Before anything moves, the memory
the run needs is estimated and a run that cannot fit is refused with the flags that fix it.

Only the surviving entries of the prunable weights train. Gradients of pruned entries are zeroed after
every backward pass and the mask is re-applied after every optimizer step, so they stay exactly zero.

Memory and time: the forward passes run under the run's autocast (``--precision``, float32 master
weights; ``heal.precision``); an objective that reads no logits stops each forward pass after the
last stream point, so the head never runs (``record_stream(stop=True)``); and joint healing can
checkpoint every block (``--grad-checkpoint``; ``heal.grad_checkpoint``), which ``auto`` turns on only
when the memory plan says the run would not fit otherwise.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.profiler import record_function

from starfish.nn.batch import Batch, batch_len, calibration_set, model_device, select, to_device
from starfish.nn.device import BLOCKWISE_MMAP_THRESHOLD, MMAP_THRESHOLD, bound_heap_growth, current_memory_mb, peak_memory_mb, reset_peak_memory, resolve_device
from starfish.distributed.ddp import average_buffers
from starfish.errors import StarfishError
from starfish.heal.blockwise import check_blockwise, heal_blockwise
from starfish.heal.resume import Checkpointer
from starfish.heal.grad_checkpoint import checkpoint_blocks
from starfish.heal.config import HealConfig
from starfish.heal.job import HealJob
from starfish.heal.objectives import Objective, get_objective
from starfish.heal.precision import float32_master_weights, resolve_precision
from starfish.heal.training import StepsOutcome, cosine_lr, set_heal_mode, train_steps, warn_divergence
from starfish.heal.stopping import held_out_monitor, plan_stopping
from starfish.heal.targets import CACHE_DTYPES, TargetCache, TensorStore, cache_location
from starfish.heal.cache_dtype import resolve_cache_dtype
from starfish.heal.runner import Runner as _Runner
from starfish.heal.vocab import head_route
from starfish.masks import Masks, is_sharded
from starfish.heal.memory_plan import MemoryEstimate, estimate_heal_memory
from starfish.heal.norms import norm_points
from starfish.nn.structure import StreamPoint, stream_points
from starfish.common.validation import first_non_finite

__all__ = ["CACHE_DTYPES", "HealResult", "cosine_lr", "heal"]


@dataclass
class HealResult:
    healer: str
    steps: int
    seconds: float
    peak_memory_mb: float
    memory_measure: str
    uses_labels: bool
    loss_history: list[float] = field(default_factory=list)  # one value per optimizer step
    lr_history: list[float] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    scope: str = "joint"
    stopped_reason: str | None = None  # why healing stopped early (divergence); None = full budget
    best_step: int | None = None  # the step whose weights were kept after a divergence
    memory_estimate: dict | None = None
    per_block: list[dict] = field(default_factory=list)  # blockwise: steps and first/last loss per block
    precision: str = "fp32"  # the autocast the forward passes ran under
    grad_checkpoint: bool = False  # whether the blocks were checkpointed (joint scope)
    master_weights: str | None = None  # a model loaded in half precision: healed through float32 copies
    cache_dtype: str | None = None  # the dtype the dense targets were cached in, and why
    cache_dtype_reason: str | None = None

    @property
    def diverged(self) -> bool:
        return self.stopped_reason is not None
    points: list[str] = field(default_factory=list)  # where each block's stream was read
    stopping: dict | None = None  # budget auto: held-out curve, kept point and stop reason (heal.stopping)
    memory_at_start_mb: float | None = None  # what was held when the peak window opened (models, data)
    kd_weight: float | None = None  # starfish_kd: the KL weight trained with (given, or settled on the first batch)

    def to_dict(self) -> dict:
        return {
            "healer": self.healer,
            "scope": self.scope,
            "steps": self.steps,
            "seconds": self.seconds,
            "peak_memory_mb": self.peak_memory_mb,
            "memory_measure": self.memory_measure,
            "memory_at_start_mb": self.memory_at_start_mb,
            "uses_labels": self.uses_labels,
            "blocks": self.blocks,
            "points": self.points,
            "loss_first": self.loss_history[0] if self.loss_history else None,
            "loss_last": self.loss_history[-1] if self.loss_history else None,
            "diverged": self.diverged,
            "stopped_reason": self.stopped_reason,
            "best_step": self.best_step,
            "memory_estimate": self.memory_estimate,
            "per_block": self.per_block,
            "precision": self.precision,
            "grad_checkpoint": self.grad_checkpoint,
            "master_weights": self.master_weights,
            "cache_dtype": self.cache_dtype,
            "cache_dtype_reason": self.cache_dtype_reason,
            "budget": self.stopping["budget"] if self.stopping else "fixed",
            "stopping": self.stopping,
            "kd_weight": self.kd_weight,
        }


def _check_inputs(objective: Objective, calib: Batch, config: HealConfig) -> None:
    labels = calib.get("labels")
    if objective.uses_labels and (labels is None or bool((labels < 0).any())):
        raise StarfishError(
            f"healer '{objective.name}' needs labelled calibration images; "
            "use a calibration folder with class sub-folders."
        )
    if batch_len(calib) == 0:
        raise StarfishError("the calibration set is empty; pass at least one image.")
    if config.scope == "blockwise":
        check_blockwise(objective)


def _heal_joint(job: HealJob) -> StepsOutcome:
    """The published recipe: the whole sparse network trains at once against cached dense targets."""
    dense, sparse, calib, config, objective, device = job.dense, job.sparse, job.calibration, job.config, job.objective, job.device
    block_names = job.block_names
    n = batch_len(calib)
    if objective.needs_dense:
        dense.to(device).eval()
    sparse.to(device)
    set_heal_mode(sparse, config)
    sharded = _sharded(sparse)
    masks = job.masks if sharded else job.masks.to(device)  # sharded: full masks stay home, shards go beside weights
    masks.apply_(sparse)
    dense_run = _Runner(dense, job.points, device, job.precision, objective.needs_logits, job.head)
    sparse_run = _Runner(sparse, job.points, device, job.precision, objective.needs_logits, job.head)
    cache: TargetCache | None = None
    if objective.needs_dense and not config.recompute_targets:
        cache = TargetCache.build(dense_run, calib, config.batch_size, job.store, objective.needs_logits, config.progress)
    labels_all = calib.get("labels")
    if objective.settle is not None:  # values the loss derives from the data, fixed before any update
        first = select(calib, torch.arange(min(n, config.batch_size)))
        with torch.no_grad():
            target = cache.get(torch.arange(min(n, config.batch_size)), device) if cache is not None else dense_run(first)
            config = job.config = objective.settle(sparse_run(first), target, config)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        batch = select(calib, index)
        if cache is not None:
            with record_function("starfish.heal.targets"):
                target = cache.get(index, device)
        elif objective.needs_dense:
            with torch.no_grad():
                target = dense_run(batch)
        else:
            target = None
        labels = labels_all[index].to(device) if labels_all is not None else None
        return objective.loss(sparse_run(batch), target, labels, config)

    if sharded:  # each rank trains on its share of every global batch (split once: here, or in train_steps under torchrun)
        from starfish.distributed.fsdp import sharded_loss

        loss_of = sharded_loss(loss_of)
    monitor = held_out_monitor(job, dense_run, sparse_run, n)
    # a norm read (output side, inside the next block) is not watched: the Runner's hooks are gone
    # before the backward pass recomputes that block, so they cannot fire twice
    watched = [p.module for p in job.points if objective.reads != "norm" or p.side != "output"]
    checkpointing = checkpoint_blocks(sparse, block_names, watched) if job.grad_checkpoint else contextlib.nullcontext()
    try:
        with checkpointing:
            return train_steps(
                sparse, masks, loss_of, n, config, config.seed, f"healing ({objective.name})", job.snapshot_device,
                job.resume_point("joint"), monitor, job.observer,
            )
    finally:
        sparse.eval()


def _memory_plan(
    dense: nn.Module,
    sparse: nn.Module,
    masks: Masks,
    calib: Batch,
    config: HealConfig,
    objective: Objective,
    points: list[StreamPoint],
    device: torch.device,
    location: str,
    precision: str,
    head: str | None = None,
) -> MemoryEstimate:
    """The run's memory plan. ``--grad-checkpoint auto`` plans without checkpointing (it costs about
    one extra forward pass per step) and re-plans with it, from the same measurement, only when the
    plain plan does not fit; ``on`` plans with it. Block-wise scope never checkpoints."""
    joint = config.scope == "joint"
    args = (dense, sparse, masks.names(), calib, config, objective, [p.block for p in points], device, location)
    kept = {k: int(m.sum()) for k, m in masks.items()}  # what a best-weights copy holds (heal.training.WeightSnapshot)
    plan = estimate_heal_memory(*args, precision=precision, checkpoint=joint and config.grad_checkpoint == "on", points=points, head=head, kept=kept)
    if joint and config.grad_checkpoint == "auto" and plan.shortfall() is not None:
        plan = estimate_heal_memory(*args, precision=precision, checkpoint=True, points=points, probe=plan.probe, head=head, kept=kept)
    return plan


def _sharded(model: nn.Module) -> bool:
    """True when the model's weights are FSDP2 shards (DTensors): healing is then data-parallel."""
    return any(is_sharded(p) for p in model.parameters())


@dataclass
class _Prepared:
    """What ``heal`` resolves before any heavy work: the settings, the signals read, and the memory plan."""

    config: HealConfig
    objective: Objective
    device: torch.device
    calib: Batch
    held: Batch | None
    record: object
    points: list[StreamPoint]
    block_names: list[str]
    head: str | None
    location: str
    precision: str
    plan: MemoryEstimate


def _prepare(
    dense: nn.Module, sparse: nn.Module, masks: Masks, calibration: object, config: HealConfig | None, block_pattern: str | None,
    holdout: object | None = None, holdout_source: str = "held-out samples",
) -> _Prepared:
    config = (config or HealConfig()).validate()
    objective: Objective = get_objective(config.healer)
    device = resolve_device(config.device)
    # host memory freed during healing goes back to the OS, so the plan holds on the CPU
    bound_heap_growth(BLOCKWISE_MMAP_THRESHOLD if config.scope == "blockwise" else MMAP_THRESHOLD)
    calib = calibration_set(calibration)
    _check_inputs(objective, calib, config)
    calib, held, record, config = plan_stopping(calib, holdout, holdout_source, objective, config)
    if _sharded(sparse):
        from starfish.distributed.fsdp import check_fsdp_scope

        check_fsdp_scope(config.scope)

    points: list[StreamPoint] = []
    if objective.needs_blocks:  # where each block's residual stream is read, decided on one batch
        points = stream_points(dense, select(calib, slice(0, 2)), block_pattern)
        if objective.reads == "norm":  # what the next layer reads after its input norm
            points = norm_points(dense, points, select(calib, slice(0, 2)), objective.name)
    head = head_route(dense, to_device(select(calib, slice(0, 2)), model_device(dense))) if objective.needs_logits else None
    location = cache_location(config.cache_device, device)
    precision = resolve_precision(config.precision, device)
    caches = objective.needs_dense and (config.scope == "blockwise" or not config.recompute_targets)
    if config.cache_dtype == "auto":  # the pipeline decides this before pruning; a direct call decides it here
        from dataclasses import replace

        choice = resolve_cache_dtype("auto", dense, calib, config.batch_size, block_pattern, precision) if caches else None
        config = replace(config, cache_dtype=choice.dtype if choice else "float16", cache_dtype_reason=choice.reason if choice else "nothing cached")
    plan = _memory_plan(dense, sparse, masks, calib, config, objective, points, device, location, precision, head)
    return _Prepared(config, objective, device, calib, held, record, points, [p.block for p in points], head, location, precision, plan)


def plan_heal(
    dense: nn.Module, sparse: nn.Module, masks: Masks, calibration: object, config: HealConfig, block_pattern: str | None = None
) -> MemoryEstimate:
    """The memory plan ``heal`` would make for this run, without healing (``compare`` plans every
    healer of its grid with it before the first heal). ``.check()`` refuses what would not fit."""
    return _prepare(dense, sparse, masks, calibration, config, block_pattern).plan


def heal(
    dense: nn.Module,
    sparse: nn.Module,
    masks: Masks,
    calibration: object,
    config: HealConfig | None = None,
    block_pattern: str | None = None,
    checkpointer: Checkpointer | None = None,
    holdout: object | None = None,
    holdout_source: str = "held-out samples",
    observer: Callable[[int], None] | None = None,
) -> HealResult:
    """Heal ``sparse`` in place against ``dense`` on unlabeled calibration data (a batch mapping,
    an image tensor or a TensorDataset; see ``batch.calibration_set``). ``checkpointer``
    (``heal.resume``) saves the healing state as it goes and continues a saved one.

    With ``config.budget == "auto"`` healing stops when the objective on ``holdout`` (unlabeled
    samples never trained on; without it, a seeded fifth of the calibration set is held out) no
    longer improves, and the best held-out weights are kept (``heal.stopping``). ``observer(steps)``
    (joint scope) is called after every optimizer step, e.g. to score the weights as healing goes.

    A ``sparse`` model in float16/bfloat16 heals through float32 master weights and returns in its
    own dtype; the healed weights are always finite (a non-finite last step is rolled back, or
    refused when nothing finite was kept)."""
    config = (config or HealConfig()).validate()
    with float32_master_weights(sparse) as widened:
        result = _heal_float32(dense, sparse, masks, calibration, config, block_pattern, checkpointer, holdout, holdout_source, observer)
    bad = first_non_finite(sparse.named_parameters()) if widened else None
    if bad is not None:
        raise StarfishError(
            f"healed weight '{bad}' does not fit the {widened[bad]} the model was loaded in; heal in float32 (--dtype float32) or lower --lr."
        )
    result.master_weights = f"float32 (loaded {', '.join(sorted({str(d).removeprefix('torch.') for d in widened.values()}))})" if widened else None
    return result


def _heal_float32(
    dense: nn.Module,
    sparse: nn.Module,
    masks: Masks,
    calibration: object,
    config: HealConfig,
    block_pattern: str | None,
    checkpointer: Checkpointer | None,
    holdout: object | None,
    holdout_source: str,
    observer: Callable[[int], None] | None,
) -> HealResult:
    """``heal`` with the trained model's tensors in float32 (``float32_master_weights``)."""
    prep = _prepare(dense, sparse, masks, calibration, config, block_pattern, holdout, holdout_source)
    config, objective, device, calib, held, record = prep.config, prep.objective, prep.device, prep.calib, prep.held, prep.record
    points, block_names, head, location, precision, estimate = prep.points, prep.block_names, prep.head, prep.location, prep.precision, prep.plan
    estimate.check()
    if config.progress:
        sys.stderr.write(f"starfish: {estimate.summary()}\n")

    store = TensorStore(location, CACHE_DTYPES[config.cache_dtype], pin=device.type != "cpu")
    snapshot_device = torch.device("cpu") if device.type != "cpu" else device
    masks.apply_(sparse)
    windowed = reset_peak_memory(device)
    at_start = current_memory_mb(device)
    started = time.perf_counter()
    per_block: list[dict] = []
    job = HealJob(
        dense, sparse, masks, calib, config, objective, block_names, device, store, snapshot_device, points=points,
        precision=precision, grad_checkpoint=estimate.checkpoint, checkpointer=checkpointer, holdout=held, stopping=record,
        observer=observer, head=head,
    )
    try:
        if config.scope == "blockwise":
            outcomes = heal_blockwise(job)
            outcome = _merge(outcomes)
            per_block = [
                {
                    "block": name,
                    "steps": o.steps,
                    "loss_first": o.losses[0] if o.losses else None,
                    "loss_last": o.losses[-1] if o.losses else None,
                    "stopped_reason": o.stopped_reason,
                }
                for name, o in outcomes
            ]
        else:
            outcome = _heal_joint(job)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: say what a --resume would continue from
        if checkpointer is not None:
            checkpointer.note_interrupted()
        raise
    finally:
        store.close()
    average_buffers(sparse)  # --distributed: BatchNorm running statistics of every rank's batch shares
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak, measure = peak_memory_mb(device, since_reset=windowed)
    if outcome.diverged:
        warn_divergence(outcome, config)
    return HealResult(
        objective.name, outcome.steps, seconds, peak, measure, objective.uses_labels, outcome.losses, outcome.lrs,
        block_names, config.scope, outcome.stopped_reason, outcome.best_step, estimate.to_dict(), per_block,
        points=[p.describe() for p in points], precision=precision, grad_checkpoint=job.grad_checkpoint,
        stopping=record.to_dict() if record is not None else None, memory_at_start_mb=at_start,
        cache_dtype=config.cache_dtype, cache_dtype_reason=config.cache_dtype_reason,
        kd_weight=job.config.kd_weight if objective.settle is not None else None,
    )


def _merge(outcomes: list[tuple[str, StepsOutcome]]) -> StepsOutcome:
    """One history for block-wise healing: every block's steps in order; the first divergence named."""
    merged = StepsOutcome()
    stopped = [(name, o) for name, o in outcomes if o.stopped_reason is not None]
    for _, o in outcomes:
        merged.steps += o.steps
        merged.losses += o.losses
        merged.lrs += o.lrs
    if stopped:
        name, first = stopped[0]
        others = f" (and {len(stopped) - 1} later blocks)" if len(stopped) > 1 else ""
        merged.stopped_reason = f"block {name}{others}: {first.stopped_reason}"
        merged.best_step, merged.best_loss = first.best_step, first.best_loss
    return merged
