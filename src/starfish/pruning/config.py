"""The pruning recipe as a plain, serialisable dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from starfish.errors import StarfishError


@dataclass
class PruneConfig:
    sparsity: float = 0.5  # fraction of the prunable weights removed, over all of them together
    pruner: str = "magnitude"
    allocation: str = "uniform"
    include: str | None = None  # regex over parameter names; replaces the default block weights
    exclude: str | None = None  # regex over parameter names; removed from the selection
    blocks: str | None = None  # regex over module names; overrides automatic block discovery

    def validate(self) -> "PruneConfig":
        if not (0.0 <= self.sparsity < 1.0):
            raise StarfishError(
                f"sparsity must be in [0, 1) (the fraction of weights removed); got {self.sparsity}."
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)
