"""The STARFISH healer: the loss definition, the mask contract, and that healing really heals."""

from __future__ import annotations

import copy

import pytest
import torch

from starfish.tasks.evaluate import predict, top1
from starfish.heal import HealConfig, heal
from starfish.heal.healing import cosine_lr
from starfish.heal.objectives import _CosineDistance, cosine_distance
from starfish.heal.training import WeightSnapshot
from starfish.masks import Masks
from starfish.pruning import PruneConfig, prune


def test_cosine_distance_per_token_and_per_map():
    a = torch.randn(2, 5, 8)
    assert cosine_distance(a, a).abs() < 1e-6
    assert torch.isclose(cosine_distance(a, -a), torch.tensor(2.0))
    # token sequences: each token compared on its own (flipping one token of ten costs 2/10)
    b = a.clone()
    b[0, 0] = -b[0, 0]
    assert torch.isclose(cosine_distance(b, a), torch.tensor(2.0 / 10), atol=1e-6)
    # feature maps: whole C*H*W map per sample, so a per-channel flip is not per-pixel
    m = torch.ones(1, 2, 2, 2)
    n = m.clone()
    n[0, 0] = -1
    assert torch.isclose(cosine_distance(n, m), torch.tensor(1.0), atol=1e-6)


def test_cosine_distance_matches_torch_in_value_and_gradient_from_a_compact_target():
    """The loss that saves no widened copies equals ``1 - F.cosine_similarity`` on float32 inputs, and
    its analytic gradients pass gradcheck (float64) for both inputs."""
    torch.manual_seed(0)
    for shape in [(2, 5, 7), (3, 4, 5, 6), (4, 9)]:
        s = torch.randn(*shape, requires_grad=True)
        target = torch.randn(*shape).half()
        ours = cosine_distance(s, target)
        (grad_ours,) = torch.autograd.grad(ours, s)
        flat_s, flat_t = (s.flatten(1), target.float().flatten(1)) if s.dim() >= 4 else (s, target.float())
        reference = (1 - torch.nn.functional.cosine_similarity(flat_s, flat_t, dim=-1, eps=1e-8)).mean()
        (grad_reference,) = torch.autograd.grad(reference, s)
        assert torch.allclose(ours, reference, atol=1e-6) and torch.allclose(grad_ours, grad_reference, atol=1e-6)
        a, b = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for _ in range(2))
        assert torch.autograd.gradcheck(lambda x, y: _CosineDistance.apply(x, y, 1e-8), (a, b))


def test_best_weights_copy_holds_only_surviving_entries_and_restores_exactly():
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    mask = torch.rand(8, 16) > 0.5
    weight.mul_(mask)
    start = weight.clone()
    snapshot = WeightSnapshot({"w": weight}, torch.device("cpu"), {"w": Masks({"w": mask})["w"]})
    snapshot.take()
    assert snapshot.copy["w"].numel() == int(mask.sum())  # half the weight's size, not all of it
    weight.add_(torch.randn(8, 16) * mask)  # training moves only kept entries
    snapshot.restore()
    assert torch.equal(weight, start) and int((weight[~mask] != 0).sum()) == 0
    weight.add_(1.0 * mask)
    snapshot.take()  # a retake reuses the copy
    weight.zero_()
    snapshot.restore()
    assert torch.equal(weight, (start + 1.0) * mask)


def test_cosine_lr_schedule_endpoints():
    assert cosine_lr(0, 70, 6e-4, 1e-6) == 6e-4
    assert abs(cosine_lr(69, 70, 6e-4, 1e-6) - 1e-6) < 1e-12
    lrs = [cosine_lr(i, 70, 6e-4, 1e-6) for i in range(70)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("bn_mode", ["train", "frozen"])
def test_only_surviving_prunable_weights_change(pretrained, calib_images, bn_mode):
    loaded = pretrained("cifar10-resnet20")
    dense = loaded.module
    sparse = copy.deepcopy(dense)
    masks = prune(sparse, PruneConfig(sparsity=0.75))
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    config = HealConfig(max_steps=3, batch_size=16, progress=False, device="cpu", bn_mode=bn_mode)
    result = heal(dense, sparse, masks, calib_images("cifar10-resnet20", 32), config)
    assert result.steps == 3 and len(result.loss_history) == 3
    assert masks.violations(sparse) == {}
    params = dict(sparse.named_parameters())
    for name, value in sparse.state_dict().items():
        if name in masks:
            assert not torch.equal(value, before[name]), f"{name} did not train"
            assert torch.all(value[~masks[name]] == 0)
        elif name in params or bn_mode == "frozen":
            assert torch.equal(value, before[name]), f"{name} changed but must stay frozen"
        elif name.endswith("running_mean"):  # BN statistics follow the sparse network in train mode
            assert not torch.equal(value, before[name]), name
    assert all(p.requires_grad for p in sparse.parameters())  # trainability restored afterwards
    assert not sparse.training and not any(m.training for m in sparse.modules())


@pytest.mark.slow
def test_healing_raises_accuracy_on_a_real_model(pretrained, calib_images, eval_set):
    spec = "cifar10-resnet20"
    dense = pretrained(spec).module
    sparse = copy.deepcopy(dense)
    masks = prune(sparse, PruneConfig(sparsity=0.75))
    data = eval_set(spec, 500)
    pruned_acc = top1(predict(sparse, data, device="cpu"))
    result = heal(dense, sparse, masks, calib_images(spec, 64), HealConfig(epochs=4, progress=False, device="cpu"))
    healed_acc = top1(predict(sparse, data, device="cpu"))
    assert result.loss_history[-1] < result.loss_history[0]
    assert healed_acc > pruned_acc + 0.10, (pruned_acc, healed_acc)
    assert masks.violations(sparse) == {}


@pytest.mark.slow
def test_recompute_and_fp16_cache_match_the_default(pretrained, calib_images):
    dense = pretrained("cifar10-vit").module
    x = calib_images("cifar10-vit", 16)
    results = []
    # float32 cache first: it is exact like recomputing; the float16 default is within rounding
    for opts in ({"cache_dtype": "float32"}, {"recompute_targets": True}, {}):
        sparse = copy.deepcopy(dense)
        masks = prune(sparse, PruneConfig(sparsity=0.5))
        r = heal(dense, sparse, masks, x, HealConfig(max_steps=2, batch_size=8, progress=False, device="cpu", **opts))
        results.append(r.loss_history)
        assert masks.violations(sparse) == {}
    assert abs(results[0][0] - results[1][0]) < 1e-5
    assert abs(results[0][0] - results[2][0]) < 1e-3
