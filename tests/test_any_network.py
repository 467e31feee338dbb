"""Networks users bring: grayscale inputs, residual adds outside modules, nested blocks, Lightning
checkpoints, user factories without preprocessing metadata, and --blocks misuse."""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from any_network_models import FORWARD_ORDER, Backwards, GrayCNN, LoopViT, NestedDenseNet, Wrapper, synthetic_images, trained_loop_vit
from starfish.cli import main
from starfish.data.images import ImageFiles
from starfish.errors import StarfishError
from starfish.heal import HealConfig, heal
from starfish.nn.capture import record_stream
from starfish.models import Preprocess, create_model
from starfish.pruning import prune
from starfish.nn.structure import StreamPoint, find_blocks, prunable_targets, stream_points

GRAY = "any_network_models:gray_cnn"


def _images(folder: Path, n: int, seed: int, classes: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"c{i % classes}" if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    return folder


@pytest.fixture
def folders(tmp_path):
    return _images(tmp_path / "calib", 8, 0), _images(tmp_path / "eval", 8, 1, classes=2)


def _run(folders, out: Path, *extra: str) -> int:
    calib, evalset = folders
    return main(["run", "--model", GRAY, "--calib", str(calib), "--eval", str(evalset), "--sparsity", "0.5",
                 "--max-steps", "2", "--batch-size", "4", "--device", "cpu", "--no-progress", "--out", str(out), *extra])


def _refused(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("starfish: error:") and needle in last, err


# --- 1. grayscale models, 2. preprocessing never silently guessed, 9. block listing in report.md ---


def test_grayscale_factory_runs_with_a_loud_assumption_and_lists_its_blocks(folders, tmp_path, capsys):
    assert _run(folders, tmp_path / "a", "--input-size", "16") == 0
    err = capsys.readouterr().err
    assert "starfish: warning:" in err and "1 channel" in err and "starfish_preprocess" in err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["preprocess"]["channels"] == 1 and report["preprocess"]["assumed"]
    assert "preprocess_assumed" in report["model_notes"]
    md = (tmp_path / "a" / "report.md").read_text()
    assert "**assumed**" in md
    assert "| 0 | `blocks.0` | its output | 1 |" in md and "| 1 | `blocks.1` | its output | 1 |" in md
    # every guessed value given: no warning, nothing marked assumed
    assert _run(folders, tmp_path / "b", "--input-size", "16", "--mean", "0.5", "--std", "0.25") == 0
    assert "warning" not in capsys.readouterr().err
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["preprocess"]["assumed"] is None and report["preprocess"]["mean"] == [0.5]


def test_grayscale_images_are_decoded_to_one_channel(folders):
    pre = Preprocess(16, (0.5,), (0.5,), channels=1)
    x = ImageFiles(sorted(folders[0].iterdir()), None, pre.transform())[0]["pixel_values"]
    assert x.shape == (1, 16, 16)
    assert ImageFiles(sorted(folders[0].iterdir()), None, Preprocess(16).transform())[0]["pixel_values"].shape == (3, 16, 16)


def test_channel_misuse_is_one_line(folders, tmp_path, capsys):
    with pytest.raises(StarfishError, match="1 channel"):
        Preprocess(channels=1)  # ImageNet's three means for one channel
    _refused(capsys, _run(folders, tmp_path / "c", "--channels", "3", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"),
             "pass --channels 1")
    _refused(capsys, _run(folders, tmp_path / "d", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"), "--mean and --std with 1 value(s)")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


# --- 4. residual adds outside any module: align the stream, not the branch increments --------------


def test_stream_points_read_the_residual_stream_of_a_loop_encoder():
    model = LoopViT().eval()
    images = torch.randn(4, 3, 16, 16)
    points = stream_points(model, {"pixel_values": images})
    assert [p.block for p in points] == [f"transformer.layers.{i}.{j}" for i in range(3) for j in range(2)]
    assert all(p.side == "input" for p in points) and points[-1].module == "transformer.norm"
    with torch.no_grad(), record_stream(model, points) as slots:
        model(images)
        reference = model.reference_stream(images)
    for got, want in zip(slots, reference, strict=True):
        torch.testing.assert_close(got, want)


def test_chains_keep_reading_block_outputs():
    for model, shape in ((GrayCNN(), (2, 1, 8, 8)), (NestedDenseNet(), (2, 3, 16, 16))):
        points = stream_points(model, {"pixel_values": torch.randn(shape)})
        assert all(p.side == "output" and p.module == p.block for p in points)


def _branch_points(model, batch, pattern=None, device=None):
    return [StreamPoint(n, n, "output") for n, _ in find_blocks(model, pattern, batch)]


@pytest.mark.slow
def test_healing_on_the_stream_is_at_least_as_good_as_on_branch_outputs(monkeypatch):
    loop = importlib.import_module("starfish.heal.healing")

    dense = trained_loop_vit()
    calib, held_out = synthetic_images(128, 1), synthetic_images(256, 2)

    def healed_kl(points_fn):
        monkeypatch.setattr(loop, "stream_points", points_fn)
        sparse = copy.deepcopy(dense)
        masks = prune(sparse, 0.7)
        heal(dense, sparse, masks, calib, HealConfig(max_steps=60, epochs=100, batch_size=32, lr=1e-3, progress=False, device="cpu"))
        assert masks.violations(sparse) == {}
        with torch.no_grad():
            d, s = dense(held_out).log_softmax(1), sparse(held_out).log_softmax(1)
        return torch.nn.functional.kl_div(s, d, log_target=True, reduction="batchmean").item()

    stream, branch = healed_kl(stream_points), healed_kl(_branch_points)
    assert stream <= branch, (stream, branch)


# --- 5. --blocks pitfalls, and blocks vs prunable targets -------------------------------------------


def test_blocks_pattern_on_a_container_or_an_idle_module_is_refused():
    with pytest.raises(StarfishError, match=r"ModuleList.*--blocks 'transformer\\.layers\\.\\d\+\\.\\d\+'"):
        find_blocks(LoopViT(), r"transformer\.layers\.\d+")
    with pytest.raises(StarfishError, match="never runs"):
        find_blocks(Backwards(), r"(stages|unused)\.\d+", {"pixel_values": torch.randn(2, 4, 8, 8)})


def test_blocks_misuse_on_the_command_line_is_one_line(folders, tmp_path, capsys):
    calib, evalset = folders
    code = main(["run", "--model", "any_network_models:loop_vit", "--calib", str(calib), "--blocks", r"transformer\.layers\.\d+",
                 "--max-steps", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o")])
    _refused(capsys, code, "never called itself")


def test_blocks_do_not_choose_the_prunable_weights():
    model = GrayCNN()
    default = prunable_targets(model)
    assert [t.name for t in default] == ["blocks.0.conv.weight", "blocks.1.conv.weight"]
    assert prunable_targets(model, block_pattern=r"blocks\.\d+\.norm") == default
    flat = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(StarfishError, match="--include"):
        prunable_targets(flat, block_pattern="0")
    with pytest.raises(StarfishError, match="--include 'nothing'"):
        prunable_targets(model, include="nothing")
    with pytest.raises(StarfishError, match="--exclude"):
        prunable_targets(model, exclude="conv")


# --- 6. block order is forward order ------------------------------------------------------------------


def test_nested_blocks_come_in_forward_order():
    model = NestedDenseNet()
    assert [n for n, _ in find_blocks(model)] == FORWARD_ORDER
    assert [n for n, _ in find_blocks(model, batch={"pixel_values": torch.randn(2, 3, 16, 16)})] == FORWARD_ORDER
    reverse = find_blocks(Backwards(), batch={"pixel_values": torch.randn(2, 4, 8, 8)})
    assert [n for n, _ in reverse] == ["stages.2", "stages.1", "stages.0"]  # hook order; never-called blocks dropped


# --- 8. PyTorch Lightning and DataParallel checkpoints --------------------------------------------


def _lightning_checkpoint(path: Path, state: dict, prefix: str) -> Path:
    torch.save({"epoch": 3, "global_step": 12, "pytorch-lightning_version": "2.4.0", "hyper_parameters": {"lr": 0.1},
                "optimizer_states": [], "lr_schedulers": [], "state_dict": {prefix + k: v for k, v in state.items()}}, path)
    return path


@pytest.mark.parametrize("prefix", ["model.", "module.", "model.module."])
def test_wrapped_checkpoints_load_and_say_what_was_stripped(tmp_path, prefix):
    trained = GrayCNN(width=8)
    torch.nn.init.normal_(trained.head.weight)
    path = _lightning_checkpoint(tmp_path / "last.ckpt", trained.state_dict(), prefix)
    loaded = create_model(GRAY, weights=path)
    assert loaded.extra["weights_prefix_stripped"] == prefix
    assert torch.equal(loaded.module.head.weight, trained.head.weight)


def test_a_model_whose_own_keys_start_with_model_keeps_them(tmp_path, monkeypatch):
    import any_network_models

    monkeypatch.setattr(any_network_models, "wrapper", Wrapper, raising=False)
    own = Wrapper().state_dict()
    torch.save(own, tmp_path / "plain.pth")
    loaded = create_model("any_network_models:wrapper", weights=tmp_path / "plain.pth")
    assert "weights_prefix_stripped" not in loaded.extra
    loaded = create_model("any_network_models:wrapper", weights=_lightning_checkpoint(tmp_path / "w.ckpt", own, "model."))
    assert loaded.extra["weights_prefix_stripped"] == "model."
