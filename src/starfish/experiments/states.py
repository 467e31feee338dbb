"""CPU copies of the tensors of a model that later steps change, to score an earlier state at the end.

A run scores the pruned and repaired models only after every choice is made (healing, stopping,
the alignment probe), so those states are kept as copies of just the tensors repair and healing
can change (the masked weights and float buffers; every float tensor when a repair follows), not
as whole-model copies, and swapped into the live model for the final scoring.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from starfish.masks import Masks, local_mask, local_view


def _live(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


class SavedState:
    """Copies (on the CPU) of some named tensors of a module, swappable back in for a while."""

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        live = _live(module)
        self.copies = {name: live[name].detach().to("cpu", copy=True) for name in names}

    @classmethod
    def changing(cls, module: nn.Module, masks: Masks, repair_follows: bool) -> "SavedState":
        """What healing changes (masked weights, float buffers), plus every float tensor when a repair follows."""
        from starfish.heal.training import snapshot_tensors

        names = list(snapshot_tensors(module, masks))
        if repair_follows:
            names = [n for n, t in _live(module).items() if t.is_floating_point()]
        return cls(module, names)

    @torch.no_grad()
    def keep_local(self, module: nn.Module) -> None:
        """After ``module`` was sharded (``--distributed fsdp``): keep only this rank's part of each copy."""
        live = _live(module)
        self.copies = {name: local_mask(saved, live[name]).to("cpu", copy=True) for name, saved in self.copies.items()}

    @torch.no_grad()
    def _swap(self, module: nn.Module) -> None:
        live = _live(module)
        for name, saved in self.copies.items():
            target = local_view(live[name])  # a sharded weight: this rank's shard
            current = target.detach().to("cpu", copy=True)
            target.copy_(saved)
            self.copies[name] = current  # one tensor's worth of extra memory at a time

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` holding this state inside the block, its own state again afterwards."""
        self._swap(module)
        try:
            yield module
        finally:
            self._swap(module)
