"""The per-step recipe shared by joint and block-wise healing, and its divergence guard.

Adam (or AdamW/SGD) over the surviving entries of the masked weights only, cosine learning rate
per optimizer step, shuffled minibatches over the calibration set for the configured epochs.
Gradients are multiplied by the mask and the mask is re-applied after every step, so pruned
entries stay exactly zero. A loss that turns non-finite or whose smoothed value climbs well
above where it started stops the run, and the weights seen at the best smoothed loss come back.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn
from torch.profiler import record_function

from starfish.distributed.context import sum_floats
from starfish.distributed.ddp import data_parallel_step
from starfish.errors import StarfishError
from starfish.heal.config import HealConfig
from starfish.heal.precision import LossScaler
from starfish.masks import Masks, is_sharded, local_view

if TYPE_CHECKING:
    from starfish.heal.resume import ResumePoint

SMOOTHING = 0.1  # weight of the newest loss in the exponential moving average
MIN_STEPS_BEFORE_STOP = 5  # a rise must last a few steps before it counts as divergence
SNAPSHOTS = 50  # at most this many copies of the best weights are taken over a run


def cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``, decaying to ``min_lr``."""
    if total <= 1:
        return lr
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * step / (total - 1)))


def total_steps(n: int, config: HealConfig) -> int:
    """Optimizer steps of the whole budget: ``epochs`` (fixed) or ``max_epochs`` (auto, which may stop sooner)."""
    steps = math.ceil(n / config.batch_size) * (config.max_epochs if config.budget == "auto" else config.epochs)
    return min(steps, config.max_steps) if config.max_steps is not None else steps


def epoch_start(steps: int, n: int, batch_size: int) -> int:
    """The first sample offset of the current epoch's remaining batches: 0 whenever an epoch begins
    (every epoch has the same number of batches), later only in the epoch a resumed run continues."""
    return steps % math.ceil(n / batch_size) * batch_size


def set_heal_mode(module: nn.Module, config: HealConfig) -> None:
    """Dropout per --train-mode; BatchNorm in train mode when --bn-mode train (pruning shifts every
    activation's statistics, so BN normalizes with batch statistics and re-estimates its running ones)."""
    module.train(config.train_mode)
    if config.bn_mode == "train":
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


def _fusable(params: list[nn.Parameter]) -> bool:
    """Adam's fused kernel (one pass over each weight instead of about ten) takes plain floating
    tensors on a CPU or CUDA device; a sharded (FSDP2) weight keeps the default implementation."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() and not is_sharded(p) for p in params)


def make_optimizer(params: list[nn.Parameter], config: HealConfig) -> torch.optim.Optimizer:
    """The optimizer over the trained weights. Adam and AdamW use the fused kernel where it applies:
    one pass over each weight per step instead of several, which matters once a heal takes hundreds of
    small steps (its speed is not measured by a benchmark of this repository)."""
    fused = {"fused": True} if _fusable(params) else {}
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


@dataclass
class StepsOutcome:
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # one value per optimizer step
    lrs: list[float] = field(default_factory=list)
    stopped_reason: str | None = None  # None = ran its full budget
    best_step: int | None = None  # the step whose (pre-update) weights were restored
    best_loss: float | None = None  # smoothed loss at that step

    @property
    def diverged(self) -> bool:
        return self.stopped_reason is not None


class DivergenceGuard:
    """Follows the smoothed loss, keeps a copy of the weights at its best, and says when to stop."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: HealConfig, total: int, store: torch.device,
                 keep: dict[str, torch.Tensor] | None = None) -> None:
        self.tensors = tensors  # what a snapshot holds: trainable weights and float buffers (BN statistics)
        self.factor = config.divergence_factor
        self.keep_best = config.keep_best
        self.every = max(1, total // SNAPSHOTS)
        self.store = store
        self.start: float | None = None
        self.smoothed: float | None = None
        self.best: float = math.inf
        self.weights = WeightSnapshot(tensors, store, keep)
        self.snapshot_step: int | None = None
        self.snapshot_loss: float | None = None

    def observe(self, step: int, loss: float) -> str | None:
        """Record the loss of the weights *before* step ``step``'s update; a reason to stop, or None."""
        if not math.isfinite(loss):
            return f"the loss became non-finite ({loss}) at step {step}"
        self.start = loss if self.start is None else self.start
        self.smoothed = loss if self.smoothed is None else (1 - SMOOTHING) * self.smoothed + SMOOTHING * loss
        if self.smoothed < self.best:
            self.best = self.smoothed
            if self.keep_best and (self.snapshot_step is None or step - self.snapshot_step >= self.every):
                self._take(step)
        if step >= MIN_STEPS_BEFORE_STOP and self.smoothed > self.factor * self.start:
            return (
                f"the smoothed loss rose to {self.smoothed:.4g} at step {step}, above "
                f"{self.factor:g} x its starting value {self.start:.4g}"
            )
        return None

    def _take(self, step: int) -> None:
        self.weights.take()
        self.snapshot_step, self.snapshot_loss = step, self.smoothed

    def restore(self) -> bool:
        return self.keep_best and self.weights.restore()


class WeightSnapshot:
    """One copy (on ``store``) of the tensors a rollback restores, retaken in place of the last.

    A masked weight is copied as its surviving entries only (``keep``: name -> boolean mask lined up
    with the tensor): its pruned entries are zero by the mask contract, so the copy of a 50%-sparse
    model is half the size of its weights (0.2 GB less on SmolLM2-135M, per copy).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], store: torch.device, keep: dict[str, torch.Tensor] | None = None) -> None:
        self.tensors = tensors
        self.store = store
        self.keep = keep or {}
        self.copy: dict[str, torch.Tensor] | None = None

    def _packed(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` on the store, as its kept entries when it is masked (one tensor's transient at a time)."""
        keep = self.keep.get(name)
        value = value.detach()
        return value.to(self.store)[keep.to(self.store)] if keep is not None else value

    @torch.no_grad()
    def take(self) -> None:
        """Copy the tensors; a retake writes into the last copy, so two copies never coexist."""
        if self.copy is None:
            # indexing by a mask already copies; a whole tensor is copied here
            self.copy = {k: self._packed(k, v) if k in self.keep else v.detach().to(self.store, copy=True) for k, v in self.tensors.items()}
            return
        for k, v in self.tensors.items():
            self.copy[k].copy_(self._packed(k, v))  # same size: the masks do not change during healing

    @torch.no_grad()
    def restore(self) -> bool:
        if self.copy is None:
            return False
        for k, v in self.tensors.items():
            saved = self.copy[k]
            if saved.shape == v.shape:  # a tensor copied whole (or a checkpoint written before packing)
                v.copy_(saved)
            else:  # pruned entries stay zero: they are already, and only the kept ones are written
                v[self.keep[k].to(v.device)] = saved.to(v.device, v.dtype)
        return True


def snapshot_tensors(module: nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
    """The tensors a divergence rollback restores: the masked (trained) weights and float buffers."""
    params = dict(module.named_parameters())
    out = {k: local_view(params[k]) for k in masks.names()}  # a sharded weight: this rank's shard
    out.update({k: b for k, b in module.named_buffers() if b.is_floating_point()})
    return out


def snapshot_keep(module: nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
    """The masks a ``WeightSnapshot`` packs by (where the masks are kept). A sharded weight is copied
    whole (its shard's mask is cut only when gradients are masked), so it has no entry."""
    params = dict(module.named_parameters())
    return {k: masks[k] for k in masks.names() if not is_sharded(params[k])}


class StepMonitor(Protocol):
    """What ``train_steps`` asks of a held-out monitor (``heal.stopping.HeldOutMonitor``)."""

    stopped: bool

    def after_step(self, step: int) -> bool: ...

    def finish(self, steps: int, total: int) -> bool: ...


def train_steps(
    module: nn.Module,
    masks: Masks,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    config: HealConfig,
    seed: int,
    desc: str,
    snapshot_device: torch.device,
    checkpoint: ResumePoint | None = None,
    monitor: StepMonitor | None = None,
    observer: Callable[[int], None] | None = None,
) -> StepsOutcome:
    """Train the masked weights of ``module`` (mask names relative to it) on ``loss_of(sample indices)``.

    Every other parameter of ``module`` is frozen for the run; trainability is restored afterwards.
    ``checkpoint`` (``heal.resume``): continue from a saved state, and save one when due.
    ``monitor`` (``heal.stopping``, budget auto) evaluates held-out data between steps, may stop the
    run on a plateau and restores the best held-out weights at the end. ``observer(steps)`` is
    called after every optimizer step (the time-to-accuracy benchmark scores the weights there).
    """
    from tqdm.auto import tqdm

    params = dict(module.named_parameters())
    trainable = [params[name] for name in masks.names()]
    was_trainable = {name: p.requires_grad for name, p in params.items()}
    for name, p in params.items():
        p.requires_grad_(name in masks)
    optimizer = make_optimizer(trainable, config)
    shared = data_parallel_step(loss_of, trainable)  # --distributed ddp: this rank's share, gradients summed
    scaler = LossScaler.for_module(config, module)  # a GradScaler for --precision fp16, else plain backward/step
    total = total_steps(n, config)
    guard = DivergenceGuard(snapshot_tensors(module, masks), config, total, snapshot_device, snapshot_keep(module, masks))
    generator = torch.Generator().manual_seed(seed)
    outcome = StepsOutcome()
    bar = tqdm(total=total, desc=desc, disable=not config.progress, leave=False)
    try:
        if checkpoint is not None:  # restores weights, optimizer, batch order, RNG, histories and guard when saved
            checkpoint.bind(module, masks, optimizer, generator, guard, outcome, n, config.batch_size, total, monitor)
            bar.update(outcome.steps)
        while outcome.steps < total and outcome.stopped_reason is None and not (monitor and monitor.stopped):
            order = torch.randperm(n, generator=generator)
            for i in range(epoch_start(outcome.steps, n, config.batch_size), n, config.batch_size):
                if outcome.steps >= total:
                    break
                lr = cosine_lr(outcome.steps, total, config.lr, config.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)  # before the forward: last step's gradients never sit beside the activations
                with record_function("starfish.heal.loss"):
                    loss = shared.loss(order[i : i + config.batch_size])
                    value = float(loss.detach())
                outcome.stopped_reason = guard.observe(outcome.steps, value)
                if outcome.stopped_reason is not None:
                    break
                with record_function("starfish.heal.backward"):
                    scaler.backward(loss)
                    shared.reduce_gradients()
                    masks.mask_gradients_(module)  # one in-place pass after the (reduced) backward; also on FSDP2 shards
                with record_function("starfish.heal.optimizer"):
                    scaler.step(optimizer)
                with record_function("starfish.heal.remask"):
                    masks.apply_(module)
                outcome.losses.append(value)
                outcome.lrs.append(lr)
                outcome.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                stop = monitor is not None and monitor.after_step(outcome.steps)  # before a checkpoint, which saves its state
                if observer is not None:
                    observer(outcome.steps)
                if checkpoint is not None:
                    checkpoint.step_done()
                if stop:
                    break
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)  # the last step's gradients would outlive the run (one block's per block, block-wise)
        for name, p in params.items():
            p.requires_grad_(was_trainable[name])
    if outcome.stopped_reason is None and outcome.steps and not all_finite(guard.tensors):  # the last update is seen by no loss
        outcome.stopped_reason = f"the weights became non-finite in step {outcome.steps - 1}"
    if outcome.stopped_reason is not None and guard.restore():
        masks.apply_(module)
        outcome.best_step, outcome.best_loss = guard.snapshot_step, guard.snapshot_loss
    if monitor is not None and monitor.finish(outcome.steps, total):
        masks.apply_(module)
    if not all_finite(guard.tensors):
        raise StarfishError(
            f"healing made the weights non-finite ({outcome.stopped_reason}) and no earlier finite weights were kept; "
            f"lower --lr (now {config.lr:g})."
        )
    return outcome


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every tensor is free of NaN and inf on every rank (FSDP shards differ, the verdict may not)."""
    bad = sum(int(not bool(torch.isfinite(t).all())) for t in tensors.values() if t.is_floating_point())
    return sum_floats(float(bad))[0] == 0


def warn_divergence(outcome: StepsOutcome, config: HealConfig) -> None:
    """One line on stderr: what happened, what was kept, and the fix."""
    kept = (
        f"kept the weights of step {outcome.best_step} (smoothed loss {outcome.best_loss:.4g})"
        if outcome.best_step is not None
        else "kept the last weights"
    )
    sys.stderr.write(f"starfish: warning: healing stopped: {outcome.stopped_reason}; {kept}; lower --lr (now {config.lr:g}).\n")
