"""The mask contract after every pruner, pattern and repair, on the real pretrained networks."""

from __future__ import annotations

import copy

import pytest
import torch

from starfish.pruning import PruneConfig, prune
from starfish.pruning.prune import input_statistics
from starfish.pruning.sparsegpt import sparsegpt_layer
from starfish.pruning.masking import lowest_k_mask
from starfish.repair import apply_repair
from starfish.nn.structure import prunable_targets

pytestmark = pytest.mark.shared

PRUNERS = ["magnitude", "random", "wanda", "sparsegpt"]


def _check_contract(model, masks, sparsity, per_layer_exact):
    assert masks.violations(model) == {}
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert bool((params[name].detach()[~keep] == 0).all())
        if per_layer_exact:
            removed = int((~keep).sum())
            assert abs(removed - sparsity * keep.numel()) <= 1, name
    total = masks.numel()
    assert abs((1 - masks.sparsity()) * total - (1 - sparsity) * total) <= 0.5


@pytest.mark.parametrize("pruner", PRUNERS)
def test_contract_resnet_unstructured_and_repairs(pruner, pretrained, calib_images):
    loaded = pretrained("cifar10-resnet20")
    calib = calib_images("cifar10-resnet20", 32)
    sparse = copy.deepcopy(loaded.module)
    masks = prune(sparse, PruneConfig(0.9, pruner=pruner), calibration=calib)
    _check_contract(sparse, masks, 0.9, True)
    for repair in ("bn", "bn+varmatch"):  # bn+varmatch runs the varmatch repair too
        repaired = copy.deepcopy(sparse)
        apply_repair(repair, loaded.module, repaired, masks, calib)
        _check_contract(repaired, masks, 0.9, True)


@pytest.mark.parametrize("pruner", PRUNERS)
def test_contract_vit_nm_pattern(pruner, pretrained, calib_images):
    loaded = pretrained("cifar10-vit")
    calib = calib_images("cifar10-vit", 8)
    sparse = copy.deepcopy(loaded.module)
    masks = prune(sparse, PruneConfig(0.5, pruner=pruner, pattern="2:4"), calibration=calib)
    _check_contract(sparse, masks, 0.5, True)
    for _, keep in masks.items():
        assert bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all())
    apply_repair("varmatch", loaded.module, sparse, masks, calib, shrinkage=0.1)
    _check_contract(sparse, masks, 0.5, True)


def test_every_allocation_meets_the_budget(pretrained, calib_images):
    loaded = pretrained("cifar10-resnet20")
    calib = calib_images("cifar10-resnet20", 32)
    for allocation in ("uniform", "global", "erk", "lamp", "rr"):
        sparse = copy.deepcopy(loaded.module)
        masks = prune(sparse, PruneConfig(0.93, allocation=allocation), calibration=calib)
        budget = round(0.93 * masks.numel())
        assert sum(int((~k).sum()) for _, k in masks.items()) == budget, allocation
        assert masks.violations(sparse) == {}


def test_sparsegpt_beats_magnitude_on_real_activations(pretrained, calib_images):
    loaded = pretrained("cifar10-resnet20")
    model = loaded.module
    calib = calib_images("cifar10-resnet20", 32)
    target = [t for t in prunable_targets(model) if t.name == "layer2.1.conv1.weight"]
    gram = input_statistics(model, target, calib, "gram")[target[0].name]
    w = dict(model.named_parameters())[target[0].name].detach()
    k = int(0.7 * w.numel())
    new, keep = sparsegpt_layer(w, gram, k)
    mag = w * lowest_k_mask(w.abs(), k)

    def error(pruned):
        d = (w - pruned).reshape(w.shape[0], -1).double()
        return float(torch.einsum("ij,jk,ik->", d, gram.double(), d))

    assert int((~keep).sum()) == k
    assert error(new) < 0.8 * error(mag)


def test_prune_without_calibration_still_works_and_errors_clearly(pretrained):
    from starfish.errors import StarfishError

    loaded = pretrained("cifar10-resnet20")
    masks = prune(copy.deepcopy(loaded.module), 0.5)  # the old call signature
    assert abs(masks.sparsity() - 0.5) < 1e-4
    with pytest.raises(StarfishError, match="--calib"):
        prune(copy.deepcopy(loaded.module), PruneConfig(0.5, pruner="wanda"))
    with pytest.raises(StarfishError, match="--sparsity 0.5"):
        PruneConfig(0.9, pattern="2:4").validate()
