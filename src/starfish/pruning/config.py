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
    pattern: str | None = None  # "N:M": at most N kept in every M consecutive input weights
    damp: float = 0.01  # sparsegpt: Hessian damping, as a fraction of its mean diagonal
    blocksize: int = 128  # sparsegpt: columns pruned and reconstructed together

    def validate(self) -> "PruneConfig":
        from starfish.common.validation import prune_settings

        prune_settings(self)  # NaN damping, non-compilable regexes
        if not (0.0 <= self.sparsity < 1.0):
            raise StarfishError(
                f"sparsity must be in [0, 1) (the fraction of weights removed); got {self.sparsity}."
            )
        from starfish.pruning.masking import parse_pattern

        nm = parse_pattern(self.pattern)
        # the pattern fixes the sparsity at 1 - N/M; any value within half a weight per group of M
        # names it (so a rounded 0.666667 means 1:3), and the pattern's exact value is what is pruned
        if nm is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 0.5 / nm[1]:
            raise StarfishError(
                f"pattern {self.pattern} fixes the sparsity at {1 - nm[0] / nm[1]:.6g}; "
                f"pass --sparsity {1 - nm[0] / nm[1]:.6g} with it (got {self.sparsity})."
            )
        if self.damp <= 0 or self.blocksize < 1:
            raise StarfishError(f"sparsegpt needs damping > 0 and block size >= 1; got {self.damp} and {self.blocksize}.")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
