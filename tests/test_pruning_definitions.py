"""Each pruning definition on small cases that can be checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from starfish.pruning.allocation import allocate, erk_densities, lamp_scores
from starfish.pruning.masking import nm_mask, parse_pattern, row_balanced_mask
from starfish.pruning.pruners import wanda_scores
from starfish.pruning.sparsegpt import block_budgets, sparsegpt_layer
from starfish.errors import StarfishError


def test_lamp_scores_by_hand():
    # squares 1, 4, 9: score(u) = w_u^2 / sum of squares of weights at least as large
    w = torch.tensor([3.0, -1.0, 2.0])
    expected = torch.tensor([9 / 9, 1 / 14, 4 / 13], dtype=torch.float64)
    assert torch.allclose(lamp_scores(w), expected)


def test_lamp_allocation_uses_one_threshold_over_lamp_scores():
    # layer a: [1, 2] -> scores [1/5, 1]; layer b: [10, 10.5, 11] -> [100/331.25, 110.25/231.25, 1]
    weights = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 10.5, 11.0])}
    counts = allocate("lamp", weights, 0.4)  # budget 2: the two lowest LAMP scores are 0.2 (a) and 0.30 (b)
    assert counts == {"a": 1, "b": 1}
    # a global magnitude threshold would empty layer a instead
    assert allocate("global", weights, 0.4) == {"a": 2, "b": 0}


def test_erk_densities_meet_the_budget_with_capping():
    shapes = {"small": (2, 2), "big": (100, 100)}
    d = erk_densities(shapes, 0.5)
    # uncapped, small would get 24.5x density: it is kept dense and big takes the rest of the budget
    assert d["small"] == 1.0
    assert math.isclose(d["big"], (0.5 * 10004 - 4) / 10000)
    kept = sum(d[k] * math.prod(s) for k, s in shapes.items())
    assert math.isclose(kept, 0.5 * 10004)


def test_erk_densities_follow_sum_over_product_without_capping():
    shapes = {"a": (10, 10), "b": (20, 20)}  # raw densities 0.2 and 0.1
    d = erk_densities(shapes, 0.1)
    assert math.isclose(d["a"] / d["b"], 2.0)
    assert math.isclose(d["a"] * 100 + d["b"] * 400, 0.1 * 500)


def test_erk_allocation_counts_are_exact():
    weights = {"small": torch.randn(2, 2), "big": torch.randn(100, 100), "conv": torch.randn(8, 4, 3, 3)}
    counts = allocate("erk", weights, 0.9)
    assert sum(counts.values()) == round(0.9 * sum(w.numel() for w in weights.values()))
    assert counts["small"] == 0  # capped at dense


def test_nm_pattern_exactly():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 8.0, 7.0, 5.0, 6.0]])
    keep = nm_mask(scores, 2, 4)
    assert keep.tolist() == [[True, False, True, False, True, True, False, False]]
    big = nm_mask(torch.rand(16, 64), 4, 8)
    assert bool((big.view(16, 8, 8).sum(-1) == 4).all())
    assert parse_pattern("2:4") == (2, 4)
    with pytest.raises(StarfishError):
        parse_pattern("4:2")
    with pytest.raises(StarfishError):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_wanda_compares_within_each_output_row():
    w = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    norms_sq = torch.tensor([1.0, 1.0])
    keep = row_balanced_mask(wanda_scores(w, None, norms_sq), 2)
    # per row the weaker weight goes; a layer-wide threshold would have emptied row 0
    assert keep.tolist() == [[False, True], [False, True]]


def test_wanda_uses_input_norms():
    w = torch.ones(2, 2)
    norms_sq = torch.tensor([4.0, 1.0])  # feature 0 has norm 2, feature 1 norm 1
    assert torch.equal(wanda_scores(w, None, norms_sq), torch.tensor([[2.0, 1.0], [2.0, 1.0]]))
    keep = row_balanced_mask(wanda_scores(w, None, norms_sq), 2)
    assert keep.tolist() == [[True, False], [True, False]]


def test_row_balanced_mask_removes_exactly_k():
    keep = row_balanced_mask(torch.rand(7, 13), 30)
    assert int((~keep).sum()) == 30
    per_row = (~keep).sum(1)
    assert int(per_row.max() - per_row.min()) <= 1


def test_sparsegpt_budget_and_reconstruction_on_a_toy_layer():
    torch.manual_seed(0)
    x = torch.randn(500, 16) @ torch.randn(16, 16)  # correlated inputs: reconstruction can help
    w = torch.randn(8, 16)
    gram = x.T.double() @ x.double()
    new, keep = sparsegpt_layer(w, gram, 80, blocksize=8)
    assert int((~keep).sum()) == 80
    assert bool((new[~keep] == 0).all())
    mag_keep = torch.ones(128, dtype=torch.bool)
    mag_keep[torch.argsort(w.abs().flatten())[:80]] = False
    err_mag = ((x @ (w - w * mag_keep.view(8, 16)).T) ** 2).sum()
    err_sgpt = ((x @ (w - new).T) ** 2).sum()
    assert err_sgpt < err_mag
    assert sum(block_budgets(80, 16, 8)) == 80


def test_sparsegpt_nm_pattern():
    torch.manual_seed(1)
    x = torch.randn(200, 16)
    new, keep = sparsegpt_layer(torch.randn(4, 16), x.T @ x, 32, pattern=(2, 4), blocksize=8)
    assert bool((keep.view(4, 4, 4).sum(-1) == 2).all())
    assert bool((new[~keep] == 0).all())
