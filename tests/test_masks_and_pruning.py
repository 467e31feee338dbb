"""The sparsity contract: exact budgets, exact zeros, masks that travel to a fresh model."""

from __future__ import annotations

import copy

import pytest
import torch

from starfish.masks import Masks
from starfish.pruning import PruneConfig, prune
from starfish.pruning.allocation import round_to_budget
from starfish.nn.structure import find_blocks, prunable_targets


@pytest.mark.parametrize("spec", ["cifar10-vit", "cifar10-resnet20"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_achieved_sparsity_matches_request(pretrained, spec, allocation, sparsity):
    model = pretrained(spec).module
    masks = prune(model, PruneConfig(sparsity=sparsity, allocation=allocation))
    total = masks.numel()
    removed = sum(int((~m).sum()) for _, m in masks.items())
    assert removed == round(sparsity * total)  # the global budget, exactly
    if allocation == "uniform":
        for name, m in masks.items():  # every layer within one weight of the request
            assert abs(int((~m).sum()) - sparsity * m.numel()) <= 1, name
    assert masks.violations(model) == {}
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert torch.all(params[name][~m] == 0)


def test_magnitude_removes_the_smallest_weights(pretrained):
    model = pretrained("cifar10-resnet20").module
    dense = copy.deepcopy(model)
    masks = prune(model, PruneConfig(sparsity=0.6))
    w = dict(dense.named_parameters())["layer2.1.conv1.weight"].abs()
    m = masks["layer2.1.conv1.weight"]
    assert w[~m].max() <= w[m].min()


def test_global_allocation_uses_one_threshold(pretrained):
    model = pretrained("cifar10-vit").module
    dense = dict(copy.deepcopy(model).named_parameters())
    masks = prune(model, PruneConfig(sparsity=0.7, allocation="global"))
    pruned_max = max(dense[n].abs()[~m].max().item() for n, m in masks.items())
    kept_min = min(dense[n].abs()[m].min().item() for n, m in masks.items())
    assert pruned_max <= kept_min
    per_layer = masks.layer_sparsity().values()
    assert max(per_layer) - min(per_layer) > 0.05  # layers really do differ


def test_default_targets_are_block_weights_only(pretrained):
    vit = pretrained("cifar10-vit").module
    names = [t.name for t in prunable_targets(vit)]
    assert len(names) == 6 * 4
    assert all(n.startswith("transformer.layers.") for n in names)
    assert "transformer.layers.0.self_attn.in_proj_weight" in names
    resnet = pretrained("cifar10-resnet20").module
    names = [t.name for t in prunable_targets(resnet)]
    assert len(names) == 18 and "conv1.weight" not in names and "linear.weight" not in names


def test_include_and_exclude_patterns(pretrained):
    model = pretrained("cifar10-resnet20").module
    names = [t.name for t in prunable_targets(model, include=r"^(conv1|linear)\.weight$")]
    assert names == ["conv1.weight", "linear.weight"]
    names = [t.name for t in prunable_targets(model, exclude=r"conv2")]
    assert len(names) == 9 and all("conv1" in n for n in names)


def test_block_discovery_on_library_models():
    import timm
    import torchvision

    assert len(find_blocks(timm.create_model("deit_tiny_patch16_224"))) == 12
    assert len(find_blocks(torchvision.models.resnet18())) == 8
    assert len(find_blocks(torchvision.models.vit_b_16())) == 12
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 3)
    assert [n for n, _ in find_blocks(encoder)] == ["layers.0", "layers.1", "layers.2"]


def test_masks_round_trip_to_a_fresh_model(pretrained, tmp_path):
    model = pretrained("cifar10-vit").module
    masks = prune(model, PruneConfig(sparsity=0.75))
    masks.save(tmp_path / "masks.safetensors")
    loaded = Masks.load(tmp_path / "masks.safetensors")
    assert loaded.names() == masks.names()
    fresh = pretrained("cifar10-vit").module
    assert loaded.violations(fresh)  # dense weights break the contract...
    loaded.apply_(fresh)
    assert loaded.violations(fresh) == {}  # ...until the masks are applied
    assert abs(loaded.sparsity() - 0.75) < 1e-6
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n


def test_round_to_budget_hits_the_total():
    sizes = {"a": 7, "b": 3, "c": 11}
    wanted = {k: 0.5 * v for k, v in sizes.items()}
    counts = round_to_budget(wanted, sizes, 10)
    assert sum(counts.values()) == 10
    assert all(abs(counts[k] - wanted[k]) <= 1 for k in sizes)
