"""``starfish diagnose`` and the new ``starfish run`` flags, end to end through the CLI."""

from __future__ import annotations

import json

import pytest

from starfish.cli import main

pytestmark = pytest.mark.shared


def test_diagnose_writes_rr_table_and_chart(shared, tmp_path):
    from conftest import CIFAR, WEIGHTS

    out = tmp_path / "diag"
    rc = main(["diagnose", "--model", "cifar10-resnet20", "--weights", str(WEIGHTS["cifar10-resnet20"]),
               "--calib", str(CIFAR / "train"), "--calib-size", "32", "--sparsity", "0.9", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "rr.json").read_text())
    assert len(rows) == 18
    for r in rows:
        assert {"layer", "params", "raw", "residual", "rr"} <= set(r)
        assert r["raw"] > 0 and r["rr"] == pytest.approx(r["residual"] / r["raw"])
    assert (out / "rr.png").stat().st_size > 1000
    assert (out / "rr.md").read_text().startswith("# Relative Repairability")


@pytest.mark.parametrize("problem", ["existing output", "sparsity", "missing folder"])
def test_diagnose_bad_input_is_one_line_and_writes_nothing(shared, tmp_path, capsys, problem):
    from conftest import CIFAR, WEIGHTS

    out = tmp_path / "diag"
    args = {"--model": "cifar10-resnet20", "--weights": str(WEIGHTS["cifar10-resnet20"]), "--calib": str(CIFAR / "train"),
            "--calib-size": "8", "--sparsity": "0.9", "--out": str(out)}
    if problem == "existing output":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif problem == "sparsity":
        args["--sparsity"] = "1.5"
    else:
        args["--calib"] = str(tmp_path / "nowhere")
    rc = main(["diagnose", *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert {"existing output": "--force", "sparsity": "(0, 1)", "missing folder": "does not exist"}[problem] in err
    if problem == "existing output":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not any(p.name.startswith(".diag.") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_run_with_pruner_allocation_repair_reports_them(shared, tmp_path):
    from conftest import CIFAR, WEIGHTS

    out = tmp_path / "run"
    rc = main(["run", "--model", "cifar10-resnet20", "--weights", str(WEIGHTS["cifar10-resnet20"]),
               "--calib", str(CIFAR / "train"), "--calib-size", "32", "--eval", str(CIFAR / "test"), "--eval-size", "200",
               "--sparsity", "0.9", "--pruner", "wanda", "--allocation", "lamp", "--repair", "varmatch",
               "--healer", "starfish", "--max-steps", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pruner"] == "wanda" and report["allocation"] == "lamp" and report["repair"] == "varmatch"
    assert len(report["layer_sparsity"]) == 18
    assert abs(report["sparsity"] - 0.9) < 1e-5
    assert report["top1"]["repaired"] is not None


def test_run_rejects_a_repair_without_calibration(shared, tmp_path, capsys):
    from conftest import WEIGHTS

    rc = main(["run", "--model", "cifar10-resnet20", "--weights", str(WEIGHTS["cifar10-resnet20"]),
               "--healer", "none", "--repair", "bn", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "--calib" in capsys.readouterr().err


@pytest.mark.slow
def test_sparsegpt_updates_are_kept_unless_healing_starts_from_dense_masked(shared, tmp_path):
    import torch
    from safetensors.torch import load_file

    from conftest import CIFAR, WEIGHTS
    from starfish.models import create_model

    dense = create_model("cifar10-resnet20", WEIGHTS["cifar10-resnet20"]).module.state_dict()
    name = "layer2.0.conv1.weight"
    found = {}
    for start in ("pruned", "dense-masked"):
        out = tmp_path / start
        rc = main(["run", "--model", "cifar10-resnet20", "--weights", str(WEIGHTS["cifar10-resnet20"]),
                   "--calib", str(CIFAR / "train"), "--calib-size", "16", "--sparsity", "0.5", "--pruner", "sparsegpt",
                   "--healer", "none", "--repair", "none", "--heal-from", start, "--no-progress", "--out", str(out)])
        assert rc == 0
        keep = load_file(str(out / "masks.safetensors"))[name].bool()
        found[start] = (load_file(str(out / "model.safetensors"))[name], keep)
    w, keep = found["dense-masked"]
    assert torch.equal(w, dense[name] * keep)
    w, keep = found["pruned"]
    assert bool((w[~keep] == 0).all())
    assert not torch.allclose(w[keep], dense[name][keep])  # SparseGPT's reconstruction is kept
