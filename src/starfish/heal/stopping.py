"""Label-free stopping (``--budget auto``): watch held-out data while healing, keep the best weights.

The published recipe trains a fixed 10 epochs, which under-trains at high sparsity and wastes time
at low sparsity. Here the learning rate follows one cosine over the *maximum* budget
(``max_epochs``) and, every ``eval_every`` epochs, the sparse model (in eval mode, as it will be
used) is measured on held-out unlabeled samples against the dense model: the healing objective
itself and KL(dense ‖ sparse) on the logits. The weights at the best monitored value are copied
(the divergence guard's ``WeightSnapshot``); after ``patience`` evaluations without an improvement
of at least ``min_delta`` (relative) healing stops, and the best weights come back. No label and no
evaluation sample is read: the held-out samples are unlabeled calibration-source data.

The monitored value is the healing objective, the quantity training lowers, so "no longer improves"
means the same thing on held-out data as in training; a healer that uses labels is monitored on the
KL instead (held-out data has no labels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Mapping

import torch
from torch import nn

from starfish.nn.batch import Batch, batch_len, select
from starfish.distributed.context import mean_over_ranks
from starfish.heal.config import HealConfig
from starfish.heal.objectives import Objective, Signals, kd_loss
from starfish.heal.training import WeightSnapshot, set_heal_mode
from starfish.heal.targets import TargetCache, TensorStore

HOLDOUT_FRACTION = 0.2  # share of the calibration set held out when no separate held-out data is given
KL_CONFIG = SimpleNamespace(temperature=1.0)


@dataclass
class HeldOutPoint:
    step: int
    epoch: float
    objective: float | None
    kl: float | None
    improved: bool

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "objective": self.objective, "kl": self.kl, "improved": self.improved}


@dataclass
class StoppingRecord:
    """What the report shows: the held-out curve, which point was kept and why healing stopped."""

    monitor: str  # "objective" or "kl"
    holdout: str  # where the held-out samples came from
    holdout_size: int
    max_epochs: int
    patience: int
    curve: list[HeldOutPoint] = field(default_factory=list)
    best_step: int | None = None
    best_epoch: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return {
            "budget": "auto",
            "monitor": self.monitor,
            "holdout": self.holdout,
            "holdout_size": self.holdout_size,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "best_step": self.best_step,
            "best_epoch": self.best_epoch,
            "reason": self.reason,
            "curve": [p.to_dict() for p in self.curve],
        }


class HeldOutMonitor:
    """Evaluates held-out data every ``eval_every`` epochs, keeps the best weights, says when to stop."""

    def __init__(
        self,
        evaluate: Callable[[], dict[str, float]],
        tensors: dict[str, torch.Tensor],
        store: torch.device,
        config: HealConfig,
        steps_per_epoch: int,
        record: StoppingRecord,
        keep: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.evaluate = evaluate
        self.weights = WeightSnapshot(tensors, store, keep)
        self.config = config
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.every = self.steps_per_epoch * config.eval_every
        self.record = record
        self.best = math.inf
        self.waited = 0
        self.stopped = False
        self.last_step: int | None = None
        self._check(0)  # the starting point: healing must beat it, or the start comes back

    def after_step(self, step: int) -> bool:
        """Called after optimizer step ``step`` (1-based count); True stops healing."""
        if step % self.every == 0:
            self._check(step)
        return self.stopped

    def finish(self, steps: int, total: int) -> bool:
        """Measure the final weights if they were not, restore the best ones; True if weights changed."""
        if self.last_step != steps:
            self._check(steps)
        if self.record.reason is None:
            self.record.reason = (
                f"reached the maximum budget ({self.config.max_epochs} epochs, {total} steps)"
                if steps >= total
                else f"healing stopped early at step {steps} (see stopped_reason)"
            )
        self.stopped = True
        if self.record.best_step == steps:
            return False
        return self.weights.restore()

    def state_dict(self) -> dict:
        """What a resumed run needs to stop where an uninterrupted one would (``heal.resume``)."""
        r = self.record
        return {
            "best": self.best, "waited": self.waited, "stopped": self.stopped, "last_step": self.last_step,
            "weights": self.weights.copy, "curve": [p.to_dict() for p in r.curve],
            "best_step": r.best_step, "best_epoch": r.best_epoch, "reason": r.reason,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best, self.waited, self.stopped, self.last_step = state["best"], state["waited"], state["stopped"], state["last_step"]
        copy = state["weights"]
        self.weights.copy = {k: v.to(self.weights.store) for k, v in copy.items()} if copy is not None else None
        r = self.record
        r.curve = [HeldOutPoint(**p) for p in state["curve"]]
        r.best_step, r.best_epoch, r.reason = state["best_step"], state["best_epoch"], state["reason"]

    def _check(self, step: int) -> None:
        values = self.evaluate()
        value = values[self.record.monitor]
        improved = math.isfinite(value) and (not math.isfinite(self.best) or value < self.best * (1 - self.config.min_delta))
        self.record.curve.append(HeldOutPoint(step, step / self.steps_per_epoch, values.get("objective"), values.get("kl"), improved))
        self.last_step = step
        if improved:
            self.best, self.waited = value, 0
            self.record.best_step, self.record.best_epoch = step, step / self.steps_per_epoch
            self.weights.take()
            return
        self.waited += 1
        if self.waited >= self.config.patience and not self.stopped:
            self.stopped = True
            self.record.reason = (
                f"held-out {self.record.monitor} did not improve by {self.config.min_delta:g} (relative) for "
                f"{self.config.patience} evaluations; best {self.best:.5g} at epoch {self.record.best_epoch:g}"
            )


def held_out_evaluator(
    dense_run: Callable[[Batch], Signals],
    sparse_run: Callable[[Batch], Signals],
    sparse: nn.Module,
    holdout: Mapping[str, torch.Tensor],
    objective: Objective,
    config: HealConfig,
    store: TensorStore,
    device: torch.device,
) -> Callable[[], dict[str, float]]:
    """A function returning the held-out ``{"objective", "kl"}`` of ``sparse`` right now (eval mode).

    The dense targets of the held-out samples are computed once (they never change)."""
    cache = TargetCache.build(dense_run, holdout, config.batch_size, store, keep_logits=True)
    n = batch_len(holdout)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        sparse.eval()
        totals = {"objective": 0.0, "kl": 0.0}
        compared = False  # KL needs logits: a run that skips the head (starfish, nmse) reports none
        try:
            for start in range(0, n, config.batch_size):
                index = torch.arange(start, min(n, start + config.batch_size))
                out = sparse_run(select(holdout, index))
                target = cache.get(index, device)
                if not objective.uses_labels:
                    totals["objective"] += float(objective.loss(out, target, None, config)) * len(index)
                if out.logits is not None and target.logits is not None:
                    totals["kl"] += float(kd_loss(out, target, None, KL_CONFIG)) * len(index)
                    compared = True
        finally:
            set_heal_mode(sparse, config)
        result = {k: v / n for k, v in totals.items()} | ({"objective": None} if objective.uses_labels else {})
        # --distributed: BatchNorm in train mode leaves each rank its own running statistics, so the
        # ranks average what they measured and take the same stop and keep decisions
        return mean_over_ranks(result | ({} if compared else {"kl": None}))

    return evaluate


def split_calibration(calibration: Batch, seed: int, fraction: float = HOLDOUT_FRACTION) -> tuple[Batch, Batch]:
    """(training part, held-out part) of a calibration set, seeded; for when no held-out data is given."""
    n = batch_len(calibration)
    held = max(1, min(n - 1, round(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    return select(calibration, order[held:].sort().values), select(calibration, order[:held].sort().values)


def strip_labels(batch: Mapping[str, torch.Tensor]) -> Batch:
    """Held-out data as model inputs only: a labels entry is dropped, never read."""
    return {k: v for k, v in batch.items() if k != "labels"}


def plan_stopping(
    calibration: Batch, holdout: object | None, source: str, objective: Objective, config: HealConfig
) -> tuple[Batch, Batch | None, StoppingRecord | None, HealConfig]:
    """(training samples, held-out samples, the record to fill, the config to heal with).

    Budget fixed: nothing held out. Budget auto: ``holdout`` (labels dropped) or, without one, a
    seeded fifth of the calibration set. Block-wise healing trains one block at a time and has no
    whole-network held-out objective to watch, so it keeps the fixed budget (said on stderr)."""
    import sys
    from dataclasses import replace

    from starfish.nn.batch import calibration_set

    if config.budget != "auto":
        return calibration, None, None, config
    if config.scope == "blockwise" or (holdout is None and batch_len(calibration) < 2):
        why = "--heal-scope blockwise" if config.scope == "blockwise" else "a single calibration sample"
        if config.progress:
            sys.stderr.write(f"starfish: note: --budget auto needs a whole-network held-out check; with {why} healing trains the fixed {config.epochs} epochs.\n")
        return calibration, None, None, replace(config, budget="fixed")
    if holdout is None:
        calibration, held = split_calibration(calibration, config.seed)
        source = f"a seeded {HOLDOUT_FRACTION:.0%} of the calibration set, not trained on (no separate held-out data)"
    else:
        held = strip_labels(calibration_set(holdout))
    monitor = "kl" if objective.uses_labels else "objective"
    record = StoppingRecord(monitor, source, batch_len(held), config.max_epochs, config.patience)
    return calibration, held, record, config


def held_out_monitor(job, dense_run: Callable[[Batch], Signals], sparse_run: Callable[[Batch], Signals], n: int) -> HeldOutMonitor | None:
    """The monitor ``train_steps`` calls for a joint-scope ``HealJob`` with held-out data, else None."""
    from starfish.heal.training import snapshot_keep, snapshot_tensors

    if job.holdout is None or job.stopping is None:
        return None
    job.dense.to(job.device).eval()
    evaluate = held_out_evaluator(dense_run, sparse_run, job.sparse, job.holdout, job.objective, job.config, job.store, job.device)
    steps_per_epoch = math.ceil(n / job.config.batch_size)
    return HeldOutMonitor(evaluate, snapshot_tensors(job.sparse, job.masks), job.snapshot_device, job.config, steps_per_epoch, job.stopping,
                          snapshot_keep(job.sparse, job.masks))
