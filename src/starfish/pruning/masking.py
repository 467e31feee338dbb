"""Turn scores into keep-masks: lowest-k in a layer, balanced across rows, or an N:M pattern.

Every function removes exactly the number of weights it is asked to, so an allocation's budget is
met to the weight; ties are broken by position (stable sort) so masks are reproducible.
"""

from __future__ import annotations

import torch

from starfish.errors import StarfishError


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): in every group of 4 consecutive input weights at most 2 are kept."""
    if pattern in (None, "", "none"):
        return None
    try:
        n_text, m_text = str(pattern).split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise StarfishError(f"pattern must look like N:M (e.g. 2:4); got '{pattern}'.") from None
    if not (0 < n < m):
        raise StarfishError(f"pattern N:M needs 0 < N < M; got '{pattern}'.")
    return n, m


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask with exactly ``k`` entries removed: the lowest scores (ties broken by position)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.argsort(scores.flatten().float(), stable=True)[:k]] = False
    return keep.view(scores.shape)


def row_counts(rows_sorted: torch.Tensor, k: int) -> torch.Tensor:
    """Split ``k`` removals over rows as evenly as possible (differences of at most one).

    The rows that lose one extra weight are those whose next-weakest weight scores lowest, so the
    split is the best balanced one for these scores.
    """
    n_rows, n_cols = rows_sorted.shape
    base, extra = divmod(k, n_rows)
    counts = torch.full((n_rows,), base, dtype=torch.long)
    if extra:
        nxt = rows_sorted[:, base]
        counts[torch.argsort(nxt, stable=True)[:extra]] += 1
    return counts


def row_balanced_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Remove ``k`` weights with each output row compared only within itself (Wanda's rule)."""
    rows = scores.reshape(scores.shape[0], -1).float()
    order = torch.argsort(rows, dim=1, stable=True)
    counts = row_counts(torch.gather(rows, 1, order), k)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(rows.shape[1]).expand_as(order).contiguous())
    keep = ranks >= counts.unsqueeze(1)
    return keep.view(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each group of ``m`` consecutive input weights of a row, keep the ``n`` best."""
    rows = scores.reshape(scores.shape[0], -1).float()
    if rows.shape[1] % m:
        raise StarfishError(
            f"an N:M pattern with M={m} needs rows whose length is a multiple of {m}; "
            f"this weight has rows of {rows.shape[1]} (exclude it with --exclude or pick another M)."
        )
    groups = rows.reshape(rows.shape[0], -1, m)
    order = torch.argsort(groups, dim=2, stable=True)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, order[..., : m - n], False)
    return keep.reshape(scores.shape)


def mask_from_scores(scores: torch.Tensor, k: int, group: str = "layer", pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask removing exactly ``k`` weights (or exactly the N:M pattern when one is given)."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    if group == "row":
        return row_balanced_mask(scores, k)
    return lowest_k_mask(scores, k)
