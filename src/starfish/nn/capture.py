"""Record block outputs (or the residual stream at chosen points) during a forward pass with hooks.

``record_stream(..., stop=True)`` also ends the forward pass (``blockio.StopForward``) as soon as
every point has been read: an objective that never reads logits (starfish, nmse) then skips the
head, whose output on a causal LM is the largest tensor of the pass ((N, L, vocab): 3.2 GB for
SmolLM2 at 32 x 512 tokens in float32) and about a fifth of its FLOPs. Callers catch StopForward.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from starfish.nn.blockio import StopForward, first_tensor
from starfish.nn.structure import StreamPoint, input_tensor
from starfish.nn.hooks import hooks


@contextmanager
def record_outputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Yields a list that holds each module's latest output (overwritten on every forward)."""
    slots: list[torch.Tensor | None] = [None] * len(modules)
    handles = []
    for i, module in enumerate(modules):
        def hook(_m, _inp, out, i=i):
            slots[i] = first_tensor(out)

        handles.append(module.register_forward_hook(hook))
    with hooks(handles):
        yield slots


@contextmanager
def record_stream(
    model: nn.Module, points: Sequence[StreamPoint], stop: bool = False
) -> Iterator[list[torch.Tensor | None]]:
    """Yields a list holding, per alignment point, the latest tensor read there: a module's output
    (forward hook) or the input it receives (forward pre-hook), as chosen by ``stream_points``.
    With ``stop``, the hook of the last point raises ``StopForward`` once every slot is filled."""
    slots: list[torch.Tensor | None] = [None] * len(points)
    last = len(points) - 1

    def done(i: int) -> None:
        if stop and i == last and all(s is not None for s in slots):
            raise StopForward

    handles = []
    for i, point in enumerate(points):
        module = model.get_submodule(point.module)
        if point.side == "output":

            def on_output(_m, _inp, out, i=i):
                slots[i] = first_tensor(out)
                done(i)

            handles.append(module.register_forward_hook(on_output))
        else:

            def on_input(_m, args, kwargs, i=i):
                slots[i] = input_tensor(args, kwargs)
                done(i)

            handles.append(module.register_forward_pre_hook(on_input, with_kwargs=True))
    with hooks(handles):
        yield slots
