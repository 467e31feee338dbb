"""Label-free repairs: per-channel statistics really match after folding; RR by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.nn.layerops import channel_axis, channels_last_2d, layer_output, watch
from starfish.pruning import PruneConfig, prune
from starfish.repair import apply_repair, list_repairs
from starfish.repair.moments import Moments, match_scale
from starfish.pruning.repairability import measure_rr
from starfish.repair.varmatch import masked_targets
from starfish.nn.structure import Target


def _layer_moments(model, targets, calib):
    acc = {}
    params = dict(model.named_parameters())

    def visit(i, module, x):
        t = targets[i]
        y = channels_last_2d(layer_output(module, t, x, params[t.name]), channel_axis(module))
        acc.setdefault(t.name, Moments()).add(y)

    watch(model, targets, calib, visit)
    return acc


def _bn_moments(model, calib):
    acc, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_hook(lambda mod, a, out, name=name: acc.setdefault(name, Moments()).add(channels_last_2d(out, 1))))
    with torch.no_grad():
        model(calib)
    for h in handles:
        h.remove()
    return acc


@pytest.mark.shared
def test_varmatch_matches_channel_statistics_vit(pretrained, calib_images):
    """ViT layers have biases: after folding, each layer's own output matches the dense moments."""
    loaded = pretrained("cifar10-vit")
    calib = calib_images("cifar10-vit", 16)
    sparse = copy.deepcopy(loaded.module)
    masks = prune(sparse, PruneConfig(0.8))
    targets = masked_targets(sparse, masks)
    before = _layer_moments(sparse, targets, calib)
    stats = apply_repair("varmatch", loaded.module, sparse, masks, calib)
    assert stats["placed"] == {"bias": len(targets)}
    after = _layer_moments(sparse, targets, calib)
    dense = _layer_moments(loaded.module, targets, calib)
    for t in targets:
        d, a, b = dense[t.name], after[t.name], before[t.name]
        assert torch.allclose(a.mean, d.mean, atol=1e-3, rtol=1e-3), t.name
        assert torch.allclose(a.std, d.std, atol=1e-3, rtol=1e-3), t.name
    # and it changed something: before the repair the stds were far off
    assert max(float((before[t.name].std / dense[t.name].std - 1).abs().max()) for t in targets) > 0.2
    assert masks.violations(sparse) == {}


@pytest.mark.shared
def test_varmatch_on_resnet_lands_in_batchnorm_affine(pretrained, calib_images):
    """Bias-free convs feed BatchNorms: the correction goes into gamma/beta, and BN outputs match."""
    loaded = pretrained("cifar10-resnet20")
    calib = calib_images("cifar10-resnet20", 32)
    sparse = copy.deepcopy(loaded.module)
    masks = prune(sparse, PruneConfig(0.8))
    stats = apply_repair("varmatch", loaded.module, sparse, masks, calib)
    assert stats["placed"] == {"batchnorm": 18}
    dense_bn, sparse_bn = _bn_moments(loaded.module, calib), _bn_moments(sparse, calib)
    for name in dense_bn:
        if name == "bn1":  # the stem is not pruned
            continue
        assert torch.allclose(sparse_bn[name].mean, dense_bn[name].mean, atol=2e-3), name
        alive = sparse_bn[name].std > 1e-6  # a channel whose every weight was pruned has nothing to scale
        assert float(alive.float().mean()) > 0.8, name
        assert torch.allclose(sparse_bn[name].std[alive], dense_bn[name].std[alive], atol=2e-3, rtol=1e-3), name


@pytest.mark.shared
def test_bn_recalibration_resets_running_stats(pretrained, calib_images):
    loaded = pretrained("cifar10-resnet20")
    calib = calib_images("cifar10-resnet20", 32)
    sparse = copy.deepcopy(loaded.module)
    masks = prune(sparse, PruneConfig(0.9))
    apply_repair("bn", loaded.module, sparse, masks, calib)
    moments = _bn_moments(sparse, calib)  # eval mode: BN output ~ (beta, |gamma|) per channel now
    bn = sparse.layer2[0].bn1
    assert torch.allclose(moments["layer2.0.bn1"].mean.float(), bn.bias.detach(), atol=1e-3)
    assert bn.momentum == 0.1 and not sparse.training


def test_shrinkage_keeps_collapsed_channels_small():
    d = torch.tensor([1.0, 1.0, 1.0])
    p = torch.tensor([1.0, 0.5, 1e-4])
    plain, shrunk = match_scale(d, p), match_scale(d, p, 0.1)
    assert torch.allclose(plain, torch.tensor([1.0, 2.0, 1e4], dtype=torch.float64))
    assert float(shrunk[2]) < 0.01 and abs(float(shrunk[0]) - 1 / 1.1) < 1e-9


def test_rr_of_an_unpruned_layer_and_a_fully_repairable_one():
    torch.manual_seed(0)
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.1]]))
        lin.bias.zero_()
    model = nn.Sequential(lin)
    x1 = torch.randn(256, 1)
    calib = torch.cat([x1, x1], 1)  # identical inputs: pruning the 0.1 weight only rescales the output
    target = [Target("0.weight", "0", "weight")]
    unpruned = measure_rr(model, target, calib, 0.0)[0]
    assert unpruned["raw"] == 0 and unpruned["rr"] is None and "undamaged" in unpruned["status"]
    half = measure_rr(model, target, calib, 0.5)[0]
    # output 1.1*x -> 1.0*x: raw = (0.1/1.1)^2, the std match restores it exactly
    assert abs(half["raw"] - (0.1 / 1.1) ** 2) < 1e-9
    assert half["rr"] < 1e-9


def test_rr_above_one_is_reported():
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.5]]))
    g = torch.Generator().manual_seed(0)
    calib = torch.randn(200_000, 2, generator=g)  # independent unit inputs a, b
    row = measure_rr(nn.Sequential(lin), [Target("0.weight", "0", "weight")], calib, 0.5)[0]
    # dense a + 0.5b, pruned a: raw = 0.25/1.25; std matching scales a by sqrt(1.25) and leaves
    # 2*1.25*(1 - 1/sqrt(1.25)) / 1.25 behind: RR = 10 * (1 - 1/sqrt(1.25)) = 1.056 > 1
    assert abs(row["raw"] - 0.2) < 0.01
    assert abs(row["rr"] - 10 * (1 - 1.25**-0.5)) < 0.02
    assert row["status"] == "repair amplifies damage"


def test_unknown_repair_and_missing_calibration():
    assert {"none", "bn", "varmatch", "bn+varmatch"} <= set(list_repairs())
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(StarfishError, match="choose one of"):
        apply_repair("nope", model, model, None, torch.zeros(1, 2))
    with pytest.raises(StarfishError, match="--calib"):
        apply_repair("bn", model, model, None, None)


@pytest.mark.shared
def test_varmatch_survives_batchnorm_recalibration_and_train_mode(pretrained, calib_images):
    """The BatchNorm placement composes with whatever re-estimates BatchNorm statistics later.

    Its running stats become the pruned moments, so normalising with batch statistics (healing in
    bn_mode=train) computes the repaired function instead of applying the correction twice, and
    recalibrating first (bn+varmatch) still ends with every BatchNorm output matching the dense one.
    """
    loaded = pretrained("cifar10-resnet20")
    calib = calib_images("cifar10-resnet20", 64)
    sparse = copy.deepcopy(loaded.module)
    masks = prune(sparse, PruneConfig(0.9))
    apply_repair("varmatch", loaded.module, sparse, masks, calib)
    in_train_mode = copy.deepcopy(sparse)
    for name, module in in_train_mode.named_modules():
        if isinstance(module, nn.BatchNorm2d) and name != "bn1":  # those after a pruned conv (not the stem's)
            module.train()  # normalise with this batch's own statistics, as healing in bn_mode=train does
    plain = copy.deepcopy(loaded.module)
    prune(plain, PruneConfig(0.9))
    with torch.no_grad():
        repaired, batch_stats, unrepaired = sparse(calib), in_train_mode(calib), plain(calib)
    scale = float(repaired.abs().mean())
    assert float((batch_stats - repaired).abs().mean()) < 1e-3 * scale
    assert float((unrepaired - repaired).abs().mean()) > 0.2 * scale  # the correction is real

    both = copy.deepcopy(loaded.module)
    prune(both, PruneConfig(0.9))
    apply_repair("bn+varmatch", loaded.module, both, masks, calib)
    dense_bn, both_bn = _bn_moments(loaded.module, calib), _bn_moments(both, calib)
    for name in dense_bn:
        if name == "bn1":  # the stem is not pruned (and was recalibrated, so it differs)
            continue
        alive = both_bn[name].std > 1e-6
        assert torch.allclose(both_bn[name].mean, dense_bn[name].mean, atol=2e-3), name
        assert torch.allclose(both_bn[name].std[alive], dense_bn[name].std[alive], atol=2e-3, rtol=1e-3), name


def test_auto_repair_choice():
    from starfish.repair import resolve_repair

    transformer = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    convnet = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert resolve_repair("auto", transformer, True, "train")[0] == "varmatch"
    assert resolve_repair("auto", convnet, True, "train")[0] == "none"
    assert resolve_repair("auto", convnet, True, "frozen")[0] == "varmatch"
    assert resolve_repair("auto", convnet, False, "train")[0] == "varmatch"  # nothing heals: the repair is all there is
    assert resolve_repair("auto", transformer, True, "train", has_calibration=False)[0] == "none"
    assert resolve_repair("bn", transformer, True, "train") == ("bn", "as requested")
