"""Adding a pruner, a healing objective, a repair or a model source is one function plus one
registration line (issue 21): a toy one of each is registered here, used through the public API
by name, listed by ``starfish models``, and removed again."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import starfish
from starfish.cli import main
from starfish.heal.objectives import OBJECTIVES, Objective, register_objective
from starfish.models import Preprocess, register_model
from starfish.models.registry import MODELS
from starfish.pruning.allocation import ALLOCATIONS, register_allocation
from starfish.pruning.pruners import PRUNERS
from starfish.pruning.pruners.base import register_pruner
from starfish.registry import Registry
from starfish.repair import REPAIRS


@contextlib.contextmanager
def restored(*registries: Registry):
    """Every registry as it was before the block."""
    saved = [dict(r._entries) for r in registries]
    try:
        yield
    finally:
        for registry, entries in zip(registries, saved):
            registry._entries.clear()
            registry._entries.update(entries)


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(pixel_values.flatten(1)))


def test_every_registry_is_the_one_registry_type():
    for registry in (MODELS, PRUNERS, ALLOCATIONS, REPAIRS, OBJECTIVES):
        assert isinstance(registry, Registry)


def test_a_toy_of_each_kind_registers_in_one_line_and_works_by_name(capsys):
    with restored(MODELS, PRUNERS, ALLOCATIONS, REPAIRS, OBJECTIVES):
        # one registration line each
        register_model("toy-net", "a two-block MLP on 8 inputs")(lambda **_: (ToyNet(), Preprocess(input_size=(1, 2, 4))))
        register_pruner("toy-smallest", description="magnitude, written out")(lambda weight, generator, stats=None: weight.abs())
        register_allocation("toy-even")(lambda weights, sparsity, context: {n: round(w.numel() * sparsity) for n, w in weights.items()})
        REPAIRS.add("toy-noop", lambda dense, sparse, masks, calibration, **options: {"touched": 0})
        register_objective(Objective("toy-mse", lambda s, d, labels, config: torch.nn.functional.mse_loss(s.logits, d.logits), description="output MSE"))

        loaded = starfish.create_model("toy-net")
        dense = loaded.module.eval()
        sparse = ToyNet()
        sparse.load_state_dict(dense.state_dict())
        calibration = {"pixel_values": torch.randn(16, 1, 2, 4, generator=torch.Generator().manual_seed(0))}
        masks = starfish.prune(sparse, starfish.PruneConfig(sparsity=0.5, pruner="toy-smallest", allocation="toy-even"))
        assert masks.sparsity() == pytest.approx(0.5)
        assert starfish.apply_repair("toy-noop", dense, sparse, masks, calibration) == {"repair": "toy-noop", "touched": 0}
        result = starfish.heal(dense, sparse, masks, calibration, starfish.HealConfig(healer="toy-mse", epochs=2, batch_size=8, device="cpu", progress=False))
        assert result.steps == 4 and not masks.violations(sparse)  # trained, and the mask contract held

        assert main(["models"]) == 0
        listed = capsys.readouterr().out
        for name in ("toy-net", "toy-smallest", "toy-even", "toy-noop", "toy-mse"):
            assert name in listed, name
    for registry, name in ((MODELS, "toy-net"), (PRUNERS, "toy-smallest"), (ALLOCATIONS, "toy-even"), (REPAIRS, "toy-noop"), (OBJECTIVES, "toy-mse")):
        assert name not in registry  # removed again: no test leaks a toy into another
