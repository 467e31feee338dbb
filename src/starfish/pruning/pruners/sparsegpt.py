"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning that reconstructs the surviving weights.

``calibrate`` accumulates the mean Gram matrix x x^T of each target's inputs in float32 on the
model's device (padding positions skipped); ``compress`` runs ``sparsegpt_layer`` on it.

Within a block, every layer's Gram matrix comes from ONE pass over the block with the block's
inputs taken from the already pruned earlier blocks and the block itself still unpruned, as in
the published SparseGPT code; the pruned block's output is then what the next block sees. That
keeps the cost at two passes per block; pruning layer by layer inside the block (each layer seeing
its pruned predecessors, the whole-model fallback's behaviour) would cost one pass per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from starfish.distributed.context import sum_, sum_floats
from starfish.distributed.statistics import active as statistics_active
from starfish.errors import StarfishError
from starfish.nn.layerops import input_matrix, real_rows
from starfish.pruning.pruners.base import PRUNERS, Pruner
from starfish.pruning.sparsegpt import sparsegpt_layer
from starfish.nn.structure import Target


@PRUNERS.register("sparsegpt")
class SparseGPT(Pruner):
    name = "sparsegpt"
    description = "OBS pruning with reconstruction of the surviving weights, block by block"
    needs_calibration = True
    reconstructs = True

    def __init__(self, seed: int = 0, blocksize: int = 128, damp: float = 0.01, **options: object) -> None:
        super().__init__(seed, **options)
        self.blocksize, self.damp = blocksize, damp
        self.grams: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}

    def calibrate(self, target: Target, module: nn.Module, inputs: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        cols = real_rows(input_matrix(module, inputs.detach()), inputs, weights).float()
        n_old = self.samples.get(target.name, 0)
        n_new = n_old + cols.shape[0]
        if n_new == 0:
            return
        update = cols.T @ cols / n_new
        old = self.grams.get(target.name)
        self.grams[target.name] = update if old is None else old * (n_old / n_new) + update
        self.samples[target.name] = n_new

    def gather_statistics(self, names: list[str]) -> None:
        """Mean Gram matrices of each rank's share -> the mean over every rank's samples."""
        if not statistics_active():
            return
        counts = sum_floats(*(self.samples.get(name, 0) for name in names))
        for name, total in zip(names, counts):
            gram = self.grams[name].double() * self.samples.get(name, 0)
            self.grams[name] = sum_(gram).div_(max(total, 1.0)).float()
            self.samples[name] = int(total)

    def compress(self, target: Target, weight: torch.Tensor, budget: int, pattern: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        gram = self.grams.pop(target.name, None)  # freed as soon as the layer is done
        if gram is None:
            raise StarfishError(f"sparsegpt saw no calibration inputs for {target.name}; pass --calib DIR or exclude it.")
        return sparsegpt_layer(weight.detach(), gram, budget, pattern, self.blocksize, self.damp)
