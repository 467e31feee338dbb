"""Record block outputs during a forward pass with forward hooks on named modules."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _first_tensor(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # e.g. Hugging Face layers return (hidden_states, ...)
    raise TypeError(f"block returned {type(output).__name__}; expected a tensor or a tuple starting with one")


@contextmanager
def record_outputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Yields a list that holds each module's latest output (overwritten on every forward)."""
    slots: list[torch.Tensor | None] = [None] * len(modules)
    handles = []
    for i, module in enumerate(modules):
        def hook(_m, _inp, out, i=i):
            slots[i] = _first_tensor(out)

        handles.append(module.register_forward_hook(hook))
    try:
        yield slots
    finally:
        for h in handles:
            h.remove()
