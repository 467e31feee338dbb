"""Wanda (Sun et al., 2023): |W_ij| * ||X_j||_2 on calibration inputs, compared within each row.

The input norms come from the *dense* network's activations (the stream passed between blocks is
the unpruned block's output), so the masks equal those of one whole-model pass of the dense model.
Padding positions of text batches do not count.
"""

from __future__ import annotations

import torch
from torch import nn

from starfish.distributed.statistics import sum_named
from starfish.errors import StarfishError
from starfish.nn.layerops import input_matrix, real_rows
from starfish.pruning.pruners.base import PRUNERS, Pruner
from starfish.nn.structure import Target


def wanda_scores(weight: torch.Tensor, generator: torch.Generator, stats: torch.Tensor | None = None) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, with ``stats`` the per-input-feature sum of squares of the inputs."""
    if stats is None:
        raise StarfishError("the wanda pruner needs calibration images; pass --calib DIR.")
    rows = weight.detach().reshape(weight.shape[0], -1).abs().float()
    return (rows * stats.float().clamp_min(0).sqrt().to(rows.device).unsqueeze(0)).view(weight.shape)


@PRUNERS.register("wanda")
class Wanda(Pruner):
    name = "wanda"
    description = "|W|·‖X_j‖₂ on calibration inputs, compared within each output row"
    group = "row"
    needs_calibration = True

    def __init__(self, seed: int = 0, **options: object) -> None:
        super().__init__(seed, **options)
        self.norms: dict[str, torch.Tensor] = {}  # per input feature: sum of squares (float64)

    def calibrate(self, target: Target, module: nn.Module, inputs: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        cols = real_rows(input_matrix(module, inputs.detach()), inputs, weights).double()
        stat = (cols * cols).sum(0)
        self.norms[target.name] = self.norms[target.name] + stat if target.name in self.norms else stat

    def gather_statistics(self, names: list[str]) -> None:
        sum_named(self.norms, names)  # float64 sums: the same norms as one process

    def scores(self, target: Target, weight: torch.Tensor) -> torch.Tensor:
        return wanda_scores(weight.detach().cpu(), self.generator, self.norms.get(target.name)).cpu()
