"""Everything one healing run works on, resolved once by ``heal`` and handed to a scope."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from starfish.nn.batch import Batch
from starfish.heal.config import HealConfig
from starfish.heal.objectives import Objective
from starfish.heal.targets import TensorStore
from starfish.masks import Masks

if TYPE_CHECKING:
    from starfish.heal.resume import Checkpointer, ResumePoint
    from starfish.heal.stopping import StoppingRecord


@dataclass
class HealJob:
    dense: nn.Module
    sparse: nn.Module
    masks: Masks
    calibration: Batch  # one mapping of stacked tensors (batch.calibration_set)
    config: HealConfig
    objective: Objective
    block_names: list[str]
    device: torch.device  # where training computes
    store: TensorStore  # where cached targets / block inputs live
    snapshot_device: torch.device  # where the divergence guard keeps the best weights
    points: list = field(default_factory=list)  # StreamPoints: where each block's stream is read (joint scope)
    precision: str = "fp32"  # resolved autocast of the forward passes (heal.precision)
    grad_checkpoint: bool = False  # joint scope: per-block gradient checkpointing of the sparse model
    checkpointer: Checkpointer | None = None  # saves / restores the healing state (--checkpoint-every, --resume)
    holdout: Batch | None = None  # budget auto: unlabeled held-out samples the stopping rule watches
    stopping: "StoppingRecord | None" = None  # budget auto: filled with the held-out curve and the stop reason
    observer: Callable[[int], None] | None = None  # joint scope: called after every optimizer step (benchmarks)
    head: str | None = None  # a causal LM's linear head, applied by the loss in chunks of tokens (heal.vocab)

    def resume_point(self, key: str) -> ResumePoint | None:
        """The checkpoint of one training run (``joint``, ``block-NNN``), or None when not checkpointing."""
        return self.checkpointer.scope(key) if self.checkpointer is not None else None
