"""Per-channel first and second moments of a layer's output, accumulated in float64.

Pairs (dense, pruned) also keep the cross moment, which is all that is needed to know the
distortion before and after any per-channel affine correction without storing activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    n: float = 0.0
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None

    def add(self, y: torch.Tensor) -> None:
        """``y`` is (samples, channels)."""
        y = y.detach().double()
        s1, s2 = y.sum(0), (y * y).sum(0)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += y.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.s1 / self.n

    @property
    def var(self) -> torch.Tensor:
        return (self.s2 / self.n - self.mean**2).clamp_min(0.0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


@dataclass
class PairMoments:
    """Moments of the dense output ``d``, the pruned output ``p`` and their cross product."""

    d: Moments
    p: Moments
    cross: torch.Tensor | None = None

    @classmethod
    def empty(cls) -> "PairMoments":
        return cls(Moments(), Moments())

    def add(self, dense: torch.Tensor, pruned: torch.Tensor) -> None:
        self.d.add(dense)
        self.p.add(pruned)
        c = (dense.detach().double() * pruned.detach().double()).sum(0)
        self.cross = c if self.cross is None else self.cross + c

    @property
    def cov(self) -> torch.Tensor:
        return self.cross / self.d.n - self.d.mean * self.p.mean

    def energy(self) -> float:
        """Sum of squares of the dense output (the distortion's normaliser)."""
        return float(self.d.s2.sum())

    def raw_error(self) -> float:
        """Sum over samples and channels of (pruned - dense)^2."""
        return float((self.p.s2 - 2 * self.cross + self.d.s2).sum())

    def corrected_error(self, scale: torch.Tensor) -> float:
        """Same sum after y -> scale * (y - mean_p) + mean_d on every channel."""
        n = self.d.n
        per = n * (scale**2 * self.p.var - 2 * scale * self.cov + self.d.var)
        return float(per.clamp_min(0.0).sum())


def match_scale(dense_std: torch.Tensor, pruned_std: torch.Tensor, shrinkage: float = 0.0) -> torch.Tensor:
    """Per-channel scale that brings the pruned std to the dense std.

    ``shrinkage`` > 0 uses sigma_d * sigma_p / (sigma_p^2 + shrinkage * sigma_d^2): the same as plain
    matching for healthy channels, but tending to 0 instead of infinity for a channel whose output
    has (nearly) collapsed, so pruning noise left in it is not blown up. A fully collapsed channel
    (no variance at all) keeps scale 1 under plain matching: there is nothing to scale.
    """
    d, p = dense_std.double(), pruned_std.double()
    if shrinkage > 0:
        return d * p / (p * p + shrinkage * d * d).clamp_min(1e-300)
    collapsed = p <= 1e-12 * d.clamp_min(1e-300)
    return torch.where(collapsed, torch.ones_like(p), d / p.clamp_min(1e-300))
