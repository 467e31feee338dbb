"""Record block outputs (or the residual stream at chosen points) during a forward pass with hooks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from starfish.blockio import first_tensor
from starfish.structure import StreamPoint, input_tensor


@contextmanager
def record_outputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Yields a list that holds each module's latest output (overwritten on every forward)."""
    slots: list[torch.Tensor | None] = [None] * len(modules)
    handles = []
    for i, module in enumerate(modules):
        def hook(_m, _inp, out, i=i):
            slots[i] = first_tensor(out)

        handles.append(module.register_forward_hook(hook))
    try:
        yield slots
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_stream(model: nn.Module, points: Sequence[StreamPoint]) -> Iterator[list[torch.Tensor | None]]:
    """Yields a list holding, per alignment point, the latest tensor read there: a module's output
    (forward hook) or the input it receives (forward pre-hook), as chosen by ``stream_points``."""
    slots: list[torch.Tensor | None] = [None] * len(points)
    handles = []
    for i, point in enumerate(points):
        module = model.get_submodule(point.module)
        if point.side == "output":

            def on_output(_m, _inp, out, i=i):
                slots[i] = first_tensor(out)

            handles.append(module.register_forward_hook(on_output))
        else:

            def on_input(_m, args, kwargs, i=i):
                slots[i] = input_tensor(args, kwargs)

            handles.append(module.register_forward_pre_hook(on_input, with_kwargs=True))
    try:
        yield slots
    finally:
        for h in handles:
            h.remove()
