"""`starfish run` end to end on the real pretrained networks, and every bad input it must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from starfish.cli import main
from starfish.masks import Masks
from starfish.models import create_model

from conftest import CIFAR, WEIGHTS


def run_args(out: Path, **overrides) -> list[str]:
    opts = {
        "--model": "cifar10-resnet20",
        "--weights": str(WEIGHTS["cifar10-resnet20"]),
        "--sparsity": "0.75",
        "--calib": str(CIFAR / "train"),
        "--calib-size": "32",
        "--eval": str(CIFAR / "test"),
        "--eval-size": "200",
        "--seed": "0",
        "--epochs": "2",
        "--batch-size": "16",
        "--out": str(out),
    }
    opts.update(overrides)
    args = ["run", "--no-progress", "--device", "cpu"]
    for k, v in opts.items():
        if v is not None:
            args += [k, v]
    return args


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shared):
    out = tmp_path_factory.mktemp("runs") / "r20"
    assert main(run_args(out)) == 0
    return out


@pytest.mark.slow
def test_run_writes_the_contracted_outputs(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    assert report["model"] == "cifar10-resnet20"
    assert abs(report["sparsity"] - 0.75) < 1e-4
    for key in ("dense", "pruned", "healed"):
        assert 0.0 <= report["top1"][key] <= 1.0
    assert report["top1"]["healed"] > report["top1"]["pruned"]
    assert report["recovered_fraction"] == pytest.approx(report["top1"]["healed"] / report["top1"]["dense"])
    assert report["heal_seconds"] > 0
    assert report["calibration"] == {"source": str(CIFAR / "train"), "size": 32, "seed": 0}
    assert report["eval"]["size"] == 200
    assert set(report["layer_sparsity"]) == set(Masks.load(finished_run / "masks.safetensors").names())
    for name in ("model.safetensors", "masks.safetensors", "config.json", "report.md"):
        assert (finished_run / name).is_file()
    assert "| healed (starfish) |" in (finished_run / "report.md").read_text()
    # the default repair is "auto": BatchNorm healed in train mode needs none
    assert (report["repair_requested"], report["repair"]) == ("auto", "none")


@pytest.mark.slow
def test_default_run_on_the_vit_repairs_before_healing(tmp_path, shared):
    """auto picks variance matching for a network without BatchNorm; the contract still holds."""
    out = tmp_path / "vit"
    args = run_args(out, **{"--model": "cifar10-vit", "--weights": str(WEIGHTS["cifar10-vit"]), "--eval-size": "100", "--epochs": None})
    assert main(args + ["--max-steps", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["repair_requested"], report["repair"]) == ("auto", "varmatch")
    assert report["repair_stats"]["placed"] == {"bias": 24}
    assert 0.0 <= report["top1"]["repaired"] <= 1.0
    assert "variance matching" in report["repair_reason"] and "requested auto" in (out / "report.md").read_text()
    weights = load_file(str(out / "model.safetensors"))
    for name, mask in Masks.load(out / "masks.safetensors").items():
        assert torch.all(weights[name][~mask] == 0), name


def test_saved_weights_keep_the_masks_and_load_into_the_original_architecture(finished_run):
    weights = load_file(str(finished_run / "model.safetensors"))
    masks = Masks.load(finished_run / "masks.safetensors")
    for name, mask in masks.items():
        assert torch.all(weights[name][~mask] == 0), name
    fresh = create_model("cifar10-resnet20").module
    fresh.load_state_dict(weights)  # plain, strict load
    assert masks.violations(fresh) == {}


@pytest.mark.slow
def test_config_reruns_to_the_same_result(finished_run, tmp_path):
    again = tmp_path / "again"
    assert main(["run", "--config", str(finished_run / "config.json"), "--out", str(again), "--no-progress"]) == 0
    first = json.loads((finished_run / "report.json").read_text())
    second = json.loads((again / "report.json").read_text())
    assert second["top1"] == pytest.approx(first["top1"], abs=1e-6)
    a = load_file(str(finished_run / "model.safetensors"))
    b = load_file(str(again / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def assert_refused(capsys, args: list[str], needle: str, out: Path | None = None) -> None:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err
    if out is not None:
        assert not out.exists()
        assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


@pytest.mark.parametrize("value", ["1.0", "1.5", "-0.1"])
def test_sparsity_outside_range_is_refused(capsys, tmp_path, shared, value):
    out = tmp_path / "out"
    assert_refused(capsys, run_args(out, **{"--sparsity": value}), "sparsity must be in [0, 1)", out)


def test_non_numeric_sparsity_is_refused(capsys, tmp_path):
    assert_refused(capsys, run_args(tmp_path / "o", **{"--sparsity": "lots"}), "--sparsity")


def test_missing_calibration_folder_is_refused(capsys, tmp_path, shared):
    out = tmp_path / "out"
    assert_refused(capsys, run_args(out, **{"--calib": str(tmp_path / "nowhere")}), "does not exist", out)


def test_empty_folders_are_refused(capsys, tmp_path, shared):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    out = tmp_path / "out"
    assert_refused(capsys, run_args(out, **{"--calib": str(empty)}), "holds no images", out)
    assert_refused(capsys, run_args(out, **{"--eval": str(empty)}), "holds no images", out)


def test_weights_for_another_architecture_are_refused(capsys, tmp_path, shared):
    out = tmp_path / "out"
    args = run_args(out, **{"--weights": str(WEIGHTS["cifar10-vit"])})
    assert_refused(capsys, args, "does not fit cifar10-resnet20", out)


def test_existing_output_directory_is_refused_unless_forced(capsys, tmp_path, shared):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(capsys, run_args(out), "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_output_may_not_overwrite_an_input(capsys, tmp_path, shared):
    assert_refused(capsys, run_args(CIFAR / "train", **{"--force": None}) + ["--force"], "would overwrite the input")


def test_calibration_size_larger_than_folder_is_refused(capsys, tmp_path, shared):
    flat = tmp_path / "flat"
    flat.mkdir()
    src = sorted((CIFAR / "train" / "cat").iterdir())[:3]
    for p in src:
        (flat / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    assert_refused(capsys, run_args(out, **{"--calib": str(flat), "--calib-size": "5"}), "larger than the 3 images", out)


@pytest.mark.slow
def test_unlabeled_flat_calibration_folder_works(tmp_path, shared):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((CIFAR / "train" / "ship").iterdir())[:16]:
        (flat / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    assert main(run_args(out, **{"--calib": str(flat), "--calib-size": "0.5", "--epochs": "1", "--eval-size": "50"})) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["size"] == 8


def test_saved_config_carries_neither_out_nor_force(finished_run, tmp_path, capsys):
    saved = json.loads((finished_run / "config.json").read_text())
    assert "out" not in saved and "force" not in saved and saved["model"] == "cifar10-resnet20"
    # without --out a rerun asks for one, instead of writing over (or beside) the first run
    assert_refused(capsys, ["run", "--config", str(finished_run / "config.json"), "--no-progress"], "--out")
    # --out to an existing folder is refused: a config never implies --force, not even an older
    # config.json that still holds out/force
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({**saved, "out": str(finished_run), "force": True}))
    taken = tmp_path / "taken"
    taken.mkdir()
    assert_refused(capsys, ["run", "--config", str(legacy), "--out", str(taken), "--no-progress"], "already exists")
    assert_refused(capsys, ["run", "--config", str(legacy), "--no-progress"], "--out")
    assert (finished_run / "report.json").is_file()


def compare_args(out: Path, **overrides) -> list[str]:
    args = run_args(out, **{"--sparsity": None, "--epochs": None, **overrides})
    return ["compare", *args[1:], "--sparsities", "0.5", "--healers", "none"]


@pytest.mark.parametrize("flag, value, needle", [("--pruner", "bogus", "unknown pruner 'bogus'"), ("--sparsegpt-damp", "-0.1", "--sparsegpt-damp")])
def test_compare_refuses_what_run_refuses_with_the_same_message(capsys, tmp_path, shared, flag, value, needle):
    out = tmp_path / "out"
    errors = []
    for args in (run_args(out, **{flag: value}), compare_args(out, **{flag: value})):
        assert_refused(capsys, args, needle, out)  # one line, exit 2, nothing written
        try:
            code = main(args)
        except SystemExit as exc:  # refused by the flag's own check, as argparse usage errors are
            code = exc.code
        assert code == 2
        errors.append(capsys.readouterr().err.split("error:", 1)[1].split(" (see ")[0])  # without the subcommand names
    assert errors[0] == errors[1]


def test_calibration_over_budget_is_refused_naming_the_flag(capsys, tmp_path, shared):
    out = tmp_path / "out"
    assert_refused(capsys, run_args(out, **{"--calib-max-gb": "0.0001"}), "--calib-max-gb", out)


def test_diagnose_and_compare_take_the_run_model_data_and_preprocessing_flags():
    from starfish.cli import DATA_FLAGS, MODEL_FLAGS, PREPROCESS_FLAGS, RUN_FLAGS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    shared_flags = {*MODEL_FLAGS, *PREPROCESS_FLAGS, *DATA_FLAGS}
    assert shared_flags <= {flag for flag, _, _ in RUN_FLAGS}
    for name in ("run", "compare", "diagnose"):
        offered = {s for a in sub[name]._actions for s in a.option_strings}
        assert shared_flags <= offered, (name, shared_flags - offered)
    args = parser.parse_args(["diagnose", "--model", "torchvision:resnet18", "--num-classes", "10", "--input-size", "64",
                              "--mean", "0.5,0.5,0.5", "--calib", "c", "--calib-max-gb", "1", "--sparsity", "0.9", "--out", "o"])
    from starfish.cli import config_from_args

    config = config_from_args(args)
    assert (config.num_classes, config.preprocess["input_size"], config.calib_max_gb) == (10, 64, 1.0)


@pytest.mark.slow
def test_batchnorm_control_is_reported_whenever_batchnorm_is_re_estimated(shared, tmp_path):
    """Healing with BatchNorm in train mode re-estimates its statistics; the dense network with only that
    done is reported beside dense, so BatchNorm adaptation is not read as recovery."""
    from starfish.reporting.report import render_markdown

    assert main(run_args(tmp_path / "bn", **{"--max-steps": "2"})) == 0
    report = json.loads((tmp_path / "bn" / "report.json").read_text())
    control = report["top1"]["dense_bn_reestimated"]
    assert control is not None and 0.0 < control <= 1.0 and control != report["top1"]["dense"]
    assert "BatchNorm re-estimated on the calibration set (control)" in render_markdown(report)
    assert main(run_args(tmp_path / "frozen", **{"--max-steps": "2", "--bn-mode": "frozen"})) == 0
    assert "dense_bn_reestimated" not in json.loads((tmp_path / "frozen" / "report.json").read_text())["top1"]
