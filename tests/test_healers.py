"""The baseline healers (kd, finetune, nmse): their losses, the mask contract, and the label rule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from starfish import HealConfig, StarfishError, heal, prune
from starfish.heal.objectives import OBJECTIVES, Signals, kd_loss, nmse_loss

HEALERS = ["starfish", "kd", "finetune", "nmse"]


def test_registry_marks_only_finetune_as_using_labels():
    assert set(HEALERS) <= set(OBJECTIVES)
    assert [n for n in HEALERS if OBJECTIVES[n].uses_labels] == ["finetune"]
    assert OBJECTIVES["nmse"].needs_blocks and not OBJECTIVES["kd"].needs_blocks
    assert not OBJECTIVES["finetune"].needs_dense


def test_kd_is_zero_at_the_teacher_and_scales_with_temperature():
    torch.manual_seed(0)
    logits = torch.randn(8, 10)
    same = kd_loss(Signals([], logits), Signals([], logits.clone()), None, HealConfig())
    assert same.abs().item() < 1e-6
    other = torch.randn(8, 10)
    low = kd_loss(Signals([], other), Signals([], logits), None, HealConfig(temperature=1.0))
    high = kd_loss(Signals([], other), Signals([], logits), None, HealConfig(temperature=4.0))
    assert low.item() > 0 and high.item() > 0 and low.item() != pytest.approx(high.item())


def test_nmse_is_scale_free_and_sums_over_blocks():
    torch.manual_seed(0)
    d1, d2 = torch.randn(4, 5, 8), torch.randn(4, 16, 3, 3)
    s1, s2 = d1 + 0.1 * torch.randn_like(d1), d2 + 0.1 * torch.randn_like(d2)
    one = nmse_loss(Signals([s1]), Signals([d1]), None, None)
    both = nmse_loss(Signals([s1, s2]), Signals([d1, d2]), None, None)
    scaled = nmse_loss(Signals([100 * s1]), Signals([100 * d1]), None, None)
    expected = ((s1 - d1) ** 2).sum() / (d1**2).sum()
    assert one.item() == pytest.approx(expected.item(), rel=1e-5)
    assert scaled.item() == pytest.approx(one.item(), rel=1e-4)
    assert both.item() > one.item()
    assert nmse_loss(Signals([d1]), Signals([d1.clone()]), None, None).item() == 0.0


@pytest.mark.parametrize("healer", HEALERS)
def test_every_healer_keeps_the_mask_contract_and_trains(healer, pretrained, calib_images, eval_set):
    loaded = pretrained("cifar10-resnet20")
    sparse = copy.deepcopy(loaded.module)
    masks = prune(sparse, 0.7)
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    images = calib_images("cifar10-resnet20", 32)
    labels = eval_set("cifar10-resnet20", 32).tensors[1]  # any real labels of the right length
    data = TensorDataset(images, labels) if healer == "finetune" else images
    result = heal(loaded.module, sparse, masks, data, HealConfig(healer=healer, max_steps=3, batch_size=16, progress=False))
    assert result.steps == 3 and len(result.loss_history) == 3
    assert all(torch.isfinite(torch.tensor(result.loss_history)))
    assert result.uses_labels == (healer == "finetune")
    assert masks.violations(sparse) == {}
    params = dict(sparse.named_parameters())
    for name, keep in masks.items():
        assert torch.count_nonzero(params[name].detach()[~keep]) == 0
    moved = [n for n in masks.names() if not torch.equal(before[n], params[n].detach())]
    assert moved, f"{healer} changed no surviving weight"


def test_finetune_refuses_unlabelled_calibration(pretrained, calib_images):
    loaded = pretrained("cifar10-resnet20")
    sparse = copy.deepcopy(loaded.module)
    masks = prune(sparse, 0.5)
    images = calib_images("cifar10-resnet20", 32)
    with pytest.raises(StarfishError, match="labelled calibration"):
        heal(loaded.module, sparse, masks, images, HealConfig(healer="finetune", max_steps=1, progress=False))
    unlabeled = TensorDataset(images, torch.full((images.shape[0],), -1))
    with pytest.raises(StarfishError, match="class sub-folders"):
        heal(loaded.module, sparse, masks, unlabeled, HealConfig(healer="finetune", max_steps=1, progress=False))
