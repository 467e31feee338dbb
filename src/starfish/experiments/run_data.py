"""What a job reads, once loaded: the calibration set, the held-out samples and the evaluation set."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable

import torch
from torch.utils.data import Dataset

from starfish.data.holdout import HeldOut
from starfish.data.loading import stream
from starfish.data.text import TextWindows
from starfish.distributed.shares import evaluation_share, lockstep_batches
from starfish.nn.batch import LABELS, Batch, batch_len


@dataclass
class RunData:
    """What a job reads: the calibration set decoded once, the evaluation files streamed per pass."""

    calibration: Batch | None  # one mapping of stacked tensors (small, within --calib-max-gb)
    evaluation: Dataset | None  # decoded one batch at a time, never all at once
    eval_batch_size: int = 256
    workers: int = 0
    eval_classes: list[str] | None = None  # class folder names of the evaluation set, in label order
    held: HeldOut | None = None  # unlabeled held-out samples (starfish.data.holdout): stopping and the alignment probe
    texts: dict[str, TextWindows] = field(default_factory=dict)  # language models: every --eval text by name (the first is ``evaluation``)
    generated: Batch | None = None  # language models: --calib-generate sequences, for healing only (starfish.data.generated_text)

    @cached_property
    def heal_calibration(self) -> Batch | None:
        """What healing trains on: the calibration text, then any sequences the dense model generated."""
        from starfish.data.generated_text import joined

        return joined(self.calibration, self.generated)

    @property
    def calib_size(self) -> int:
        return batch_len(self.calibration) if self.calibration is not None else 0

    @property
    def eval_size(self) -> int:
        return len(self.evaluation) if self.evaluation is not None else 0  # type: ignore[arg-type]

    def eval_batches(self, device: torch.device | None = None) -> Iterable[Batch]:
        """A fresh pass over the evaluation set as dict batches (DataLoader, pinned on accelerators)."""
        if self.evaluation is None:
            return iter(())
        share = evaluation_share(self.evaluation)  # every W-th sample under --distributed; tasks sum the tallies
        if isinstance(share, TextWindows):  # one window at a time: full-vocabulary logits are large
            return lockstep_batches(share.batches(1), self.eval_size, 1)
        return lockstep_batches(stream(share, self.eval_batch_size, self.workers, device), self.eval_size, self.eval_batch_size)

    def calibration_labelled(self) -> bool:
        labels = self.calibration.get(LABELS) if self.calibration is not None else None
        return labels is not None and not bool((labels < 0).any())

    def evaluation_labelled(self) -> bool:
        labels = getattr(self.evaluation, "labels", None)
        return labels is not None
