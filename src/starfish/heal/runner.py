"""Run a model on one batch and return the signals a healing objective reads (``Signals``).

Shared by the heal loop (dense and sparse passes) and the cache-dtype probe, which measures the
range of exactly what the loop would cache.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from starfish.nn.batch import call_model, position_weights, to_device
from starfish.nn.blockio import StopForward
from starfish.tasks.evaluate import logits_of
from starfish.nn.capture import record_stream
from starfish.heal.objectives import Signals
from starfish.heal.precision import AUTOCAST_DTYPES, as_float, autocast
from starfish.heal.saved_tensors import lean_saved_tensors
from starfish.heal.vocab import stop_at_head
from starfish.nn.structure import StreamPoint


class Runner:
    """Runs a model on a batch and returns the Signals an objective needs: under the run's autocast,
    stopped after the last stream point when no logits are read (the head never runs), with every
    signal cast back to float32 so the loss is computed in float32 outside the autocast region, and
    what is saved for backward kept small (``heal.saved_tensors``)."""

    def __init__(
        self, model: nn.Module, points: list[StreamPoint], device: torch.device, precision: str = "fp32", needs_logits: bool = True,
        head: str | None = None,
    ) -> None:
        self.model = model
        self.points = points
        self.device = device
        self.precision = precision
        self.skip_head = bool(points) and not needs_logits
        self.head = head if needs_logits else None  # the loss applies this head itself, chunk by chunk (heal.vocab)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> Signals:
        batch = to_device(batch, self.device)
        logits = None
        with (
            autocast(self.precision, self.device),
            lean_saved_tensors(),
            record_stream(self.model, self.points, stop=self.skip_head) as slots,
            stop_at_head(self.model, self.head) as hidden,
        ):
            try:
                logits = logits_of(call_model(self.model, batch))
            except StopForward:
                pass
        head = self.model.get_submodule(self.head) if self.head is not None else None
        blocks = [as_float(s) for s in slots if s is not None]
        head_dtype = AUTOCAST_DTYPES.get(self.precision) if head is not None else None  # the head's product as autocast would run it
        return Signals(blocks, as_float(logits), position_weights(batch), as_float(hidden[0]), head, head_dtype)
