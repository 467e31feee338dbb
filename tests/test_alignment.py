"""Per-block alignment: 1.0 for the dense model itself, lower for a pruned copy, worse with sparsity."""

from __future__ import annotations

import copy

import pytest

from starfish import prune
from starfish.experiments.alignment import DenseReference, block_alignment


@pytest.mark.slow
def test_alignment_is_one_for_dense_and_drops_with_sparsity(pretrained, calib_images):
    loaded = pretrained("cifar10-vit")
    images = calib_images("cifar10-vit", 32)
    reference = DenseReference(loaded.module, images, batch_size=16)
    same = reference.alignment(copy.deepcopy(loaded.module))
    assert list(same) == [f"transformer.layers.{i}" for i in range(6)]
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in same.values())
    means = []
    for sparsity in (0.5, 0.9):
        sparse = copy.deepcopy(loaded.module)
        prune(sparse, sparsity)
        values = reference.alignment(sparse)
        assert values == pytest.approx(block_alignment(loaded.module, sparse, images, batch_size=16), abs=1e-6)
        assert all(v < 0.999 for v in values.values())
        means.append(sum(values.values()) / len(values))
    assert means[1] < means[0]
