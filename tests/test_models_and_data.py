"""Model specs, weight loading and the data helpers."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from starfish.data.images import balanced_subset, index_image_folder, resolve_size
from starfish.errors import StarfishError
from starfish.tasks.evaluate import predict, top1
from starfish.models import create_model, list_models

from conftest import CIFAR, WEIGHTS


def test_builtin_models_are_listed():
    assert set(list_models()) >= {"cifar10-vit", "cifar10-resnet20", "cifar10-resnet56"}
    assert list_models("cifar10-resnet*") == ["cifar10-resnet20", "cifar10-resnet56"]


@pytest.mark.slow
@pytest.mark.parametrize("spec, expected", [("cifar10-vit", 0.7172), ("cifar10-resnet20", 0.8103)])
def test_pretrained_builtins_reproduce_the_shared_accuracy(eval_set, spec, expected):
    """On a 1,000-image balanced subset the dense accuracy sits near the full-test-set figure."""
    acc = top1(predict(create_model(spec, WEIGHTS[spec]).module, eval_set(spec, 1000), device="cpu"))
    assert abs(acc - expected) < 0.04, acc


def test_library_and_user_specs(tmp_path, monkeypatch):
    tv = create_model("torchvision:resnet18", num_classes=10)
    assert tv.module(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    tm = create_model("timm:resnet10t", num_classes=7)
    assert tm.module(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    import timm

    expected = timm.data.resolve_data_config({}, model=tm.module)
    assert tm.preprocess.input_size == expected["input_size"][-1]
    assert tm.preprocess.mean == tuple(expected["mean"])
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        import torch
        def tiny():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    user = create_model("my_nets:tiny")
    assert user.module(torch.randn(2, 3, 2, 2)).shape == (2, 3)
    sys.modules.pop("my_nets", None)


def test_bad_specs_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(StarfishError, match="unknown model"):
        create_model("resnet9000")
    with pytest.raises(StarfishError, match="cannot import"):
        create_model("no_such_package.mod:factory")
    with pytest.raises(StarfishError, match="does not exist"):
        create_model("cifar10-vit", tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(StarfishError, match="could not read weights"):
        create_model("cifar10-vit", junk)


def test_folder_index_and_subsets(tmp_path):
    index = index_image_folder(CIFAR / "test")
    assert index.classes[:3] == ["airplane", "automobile", "bird"] and len(index) == 10000
    picks = balanced_subset(index.labels, 25, seed=3)
    counts = torch.bincount(torch.tensor([index.labels[i] for i in picks]), minlength=10)
    assert counts.max() - counts.min() <= 1 and len(set(picks)) == 25
    assert picks == balanced_subset(index.labels, 25, seed=3)
    assert resolve_size(0.02, 10000, "calib") == 200
    assert resolve_size(None, 50, "calib") == 50
    with pytest.raises(StarfishError):
        resolve_size(0, 50, "calib")
    mixed = tmp_path / "mixed"
    (mixed / "a").mkdir(parents=True)
    src = next((CIFAR / "test" / "cat").iterdir())
    (mixed / "a" / "x.jpg").write_bytes(src.read_bytes())
    (mixed / "y.jpg").write_bytes(src.read_bytes())
    with pytest.raises(StarfishError, match="mixes images"):
        index_image_folder(mixed)


def test_hugging_face_folder_spec_prunes_and_heals(tmp_path):
    """A transformers image classifier saved locally: blocks found, pruned, healed, logits read."""
    import copy

    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from starfish.heal import HealConfig, heal
    from starfish.pruning import prune
    from starfish.nn.structure import find_blocks

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=10)
    ViTForImageClassification(cfg).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2]).save_pretrained(tmp_path)
    loaded = create_model(f"hf:{tmp_path}")
    assert loaded.preprocess.input_size == 32 and loaded.preprocess.mean == (0.4, 0.4, 0.4)
    assert len(find_blocks(loaded.module)) == 2
    sparse = copy.deepcopy(loaded.module)
    masks = prune(sparse, 0.5)
    result = heal(loaded.module, sparse, masks, torch.randn(8, 3, 32, 32), HealConfig(max_steps=2, progress=False, device="cpu"))
    assert result.steps == 2 and masks.violations(sparse) == {}
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    assert predict(sparse, data, device="cpu").logits.shape == (4, 10)
