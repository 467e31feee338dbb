"""Hostile inputs, faults and interruptions: every one ends in a one-line error (exit 2) or a clean
interrupt, writes no partial output, touches no input, and never loses earlier results."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from starfish.cli import main
from starfish.masks import Masks
from starfish.common.outputs import MARKER, atomic_output_dir, check_output_dir, release_output_lock, save_weights

from conftest import CIFAR, REPO, WEIGHTS
from test_cli import run_args as cli_run_args


def run_args(out: Path | str, *extra: str, **overrides: str | None) -> list[str]:
    """A tiny, fast `starfish run` (no repair or healing, 8 calibration and 20 evaluation images)."""
    tiny = {"--sparsity": "0.5", "--calib-size": "8", "--eval-size": "20", "--epochs": None, "--batch-size": None,
            "--healer": "none", "--repair": "none"}
    return cli_run_args(out, **{**tiny, **overrides}) + list(extra)


def refused(capsys, args: list[str], needle: str) -> str:
    """Exit 2 with one `starfish: error:`-style line containing ``needle`` and no traceback."""
    try:
        code = main(args)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err
    return err


def no_debris(folder: Path, name: str) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture()
def no_heavy_work(monkeypatch):
    """Fail the test if a model is built: the refusal must come from validation alone."""
    import starfish.experiments.run

    def boom(*a, **k):
        raise AssertionError("heavy work started before the input was refused")

    monkeypatch.setattr(starfish.experiments.run, "build_model", boom)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, shared) -> Path:
    """One finished run, shared read-only; tests that change an output work on a copy."""
    out = tmp_path_factory.mktemp("first") / "r"
    assert main(run_args(out)) == 0
    return out


def copy_of(run: Path, folder: Path) -> Path:
    return Path(shutil.copytree(run, folder / run.name))


# --- 1. --force only replaces what starfish wrote, never a dangerous place ----------------


def test_empty_out_is_refused(capsys, tmp_path, monkeypatch, no_heavy_work):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    refused(capsys, run_args("", "--force"), "--out is empty")
    assert (tmp_path / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("where", [".", "..", "/", "~"])
def test_force_never_replaces_the_working_folder_its_parents_root_or_home(capsys, tmp_path, monkeypatch, no_heavy_work, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep")
    monkeypatch.chdir(work)
    out = str(Path(where).expanduser())
    refused(capsys, run_args(out, "--force"), "choose")
    assert (work / "mine.txt").read_text() == "keep"
    no_debris(tmp_path, "work")


def test_force_refuses_a_folder_starfish_did_not_write(capsys, tmp_path, no_heavy_work):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    refused(capsys, run_args(out, "--force"), "not written by starfish")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    no_debris(tmp_path, "theirs")


@pytest.mark.slow
def test_force_replaces_a_starfish_output_and_cleans_scratch_of_dead_runs(tmp_path, first_run):
    out = copy_of(first_run, tmp_path)
    assert (out / MARKER).is_file()
    (out / "stale.txt").write_text("from before")
    partial = tmp_path / ".r.partial-999999999"  # left by a run killed while writing
    partial.mkdir()
    (partial / "model.safetensors").write_text("half written")
    assert main(run_args(out, "--force")) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file() and (out / MARKER).is_file()
    no_debris(tmp_path, "r")


# --- 3. non-finite weights, corrupt files, and the mask contract under NaN ---------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_non_finite_weights_are_refused_naming_the_tensor(capsys, tmp_path, shared, suffix):
    from safetensors.torch import save_file

    from starfish.models import create_model

    state = create_model("cifar10-resnet20", WEIGHTS["cifar10-resnet20"]).module.state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan") if suffix == ".pth" else float("inf")
    bad = tmp_path / f"bad{suffix}"
    torch.save(state, bad) if suffix == ".pth" else save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    out = tmp_path / "out"
    refused(capsys, run_args(out, **{"--weights": str(bad)}), "'layer2.0.conv1.weight'")
    assert not out.exists()
    no_debris(tmp_path, "out")


def test_corrupt_safetensors_weights_and_masks_are_one_line_errors(capsys, tmp_path, first_run):
    good = first_run
    for name, flag in (("model.safetensors", "--weights"), ("masks.safetensors", "--masks")):
        broken = tmp_path / f"broken-{name}"
        broken.write_bytes((good / name).read_bytes()[:100])
        out = tmp_path / f"out-{name}"
        refused(capsys, run_args(out, **{flag: str(broken)}), str(broken))
        assert not out.exists()


def test_masking_sets_pruned_entries_to_exact_zero_even_over_nan():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.fill_(float("nan"))
        layer.weight[0, 0] = float("inf")
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 0] = mask[1] = False
    masks = Masks({"weight": mask})
    masks.apply_(layer)
    assert torch.equal(layer.weight[~mask], torch.zeros(5))
    assert masks.violations(layer) == {}


def test_floating_point_masks_are_refused(capsys, tmp_path, first_run):
    from safetensors.torch import save_file

    good = first_run
    floaty = {k: v.float() * 0.7 for k, v in Masks.load(good / "masks.safetensors").state_dict().items()}
    path = tmp_path / "float_masks.safetensors"
    save_file(floaty, str(path))
    refused(capsys, run_args(tmp_path / "out", **{"--masks": str(path)}), "not boolean")


# --- 4. evaluation labels ----------------------------------------------------------------------


def _class_folder(root: Path, classes: list[str], per_class: int = 2, empty: tuple[str, ...] = ()) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        if name in empty:
            continue
        for p in sorted((CIFAR / "test" / name).iterdir())[:per_class]:
            shutil.copy(p, root / name / p.name)
    return root


def test_an_empty_class_folder_is_refused_by_name(capsys, tmp_path, shared):
    classes = sorted(p.name for p in (CIFAR / "test").iterdir())
    evaldir = _class_folder(tmp_path / "eval", classes, empty=("bird",))
    refused(capsys, run_args(tmp_path / "out", **{"--eval": str(evaldir), "--eval-size": None}), str(evaldir / "bird"))


@pytest.mark.parametrize("count", [3, 12])
def test_class_count_must_match_the_models_outputs(capsys, tmp_path, shared, count):
    classes = sorted(p.name for p in (CIFAR / "test").iterdir())
    names = classes[:count] if count <= 10 else classes + ["zebra", "zz_unknown"]
    root = tmp_path / "eval"
    _class_folder(root, [n for n in names if n in classes])
    for extra in names[10:]:
        (root / extra).mkdir()
        shutil.copy(next((CIFAR / "test" / "cat").iterdir()), root / extra / "x.jpg")
    out = tmp_path / "out"
    err = refused(capsys, run_args(out, **{"--eval": str(root), "--eval-size": None}), f"has {count} class folders")
    assert "predicts 10 classes" in err
    assert not out.exists()


# --- 6. one writer per output ------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_a_locked_output_fails_fast(capsys, tmp_path, shared):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from starfish.common.outputs import check_output_dir; "
         f"check_output_dir({str(out)!r}, False); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        refused(capsys, run_args(out), "another starfish process")
        assert time.perf_counter() - started < 30
    finally:
        holder.kill()
        holder.wait()
    assert check_output_dir(out, False) == out  # the lock died with its holder
    release_output_lock(out)
    no_debris(tmp_path, "busy")


# --- 7 and 12. bad values end in one line, before any heavy work ---------------------------------


BAD_FLAGS = [
    (["--calib-size", "nan"], "--calib-size"),
    (["--calib-size", "inf"], "--calib-size"),
    (["--calib-size", "1.5"], "--calib-size"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--min-lr", "nan"], "--min-lr"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--workers", "-1"], "--workers"),
    (["--device", "quantum"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--cache-device", "nowhere"], "--cache-device"),
    (["--std", "0,0,0"], "--std"),
    (["--std", "0.2,nan,0.2"], "--std"),
    (["--input-size", "0"], "--input-size"),
    (["--include", "conv[("], "--include"),
    (["--blocks", "*"], "--blocks"),
    (["--repair-shrinkage", "nan"], "--repair-shrinkage"),
    (["--repair-shrinkage", "-1"], "--repair-shrinkage"),
    (["--sparsegpt-damp", "nan"], "--sparsegpt-damp"),
    (["--epochs", "-1"], "--epochs"),
    (["--max-steps", "0"], "--max-steps"),
]


@pytest.mark.parametrize("flags,needle", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_values_are_one_line_errors_before_any_work(capsys, tmp_path, no_heavy_work, flags, needle):
    out = tmp_path / "out"
    refused(capsys, run_args(out, *flags), needle)
    assert not out.exists()
    no_debris(tmp_path, "out")


def test_sparsity_nan_is_refused(capsys, tmp_path, no_heavy_work):
    refused(capsys, run_args(tmp_path / "out", **{"--sparsity": "nan"}), "sparsity")


BAD_CONFIGS = [
    ({"heal": {"lr": "fast"}}, "'heal.lr'"),
    ({"heal": {"lr": float("nan")}}, "--lr"),
    ({"heal": {"temperature": -2.0}}, "--temperature"),
    ({"heal": {"epochs": 2.5}}, "'heal.epochs'"),
    ({"heal": {"bogus": 1}}, "heal.bogus"),
    ({"prune": None}, "'prune'"),
    ({"prune": {"sparsity": "half"}}, "'prune.sparsity'"),
    ({"prune": {"damp": float("nan")}}, "--sparsegpt-damp"),
    ({"seed": None}, "'seed'"),
    ({"seed": -5}, "--seed"),
    ({"calib_size": "all"}, "'calib_size'"),
    ({"calib_size": 1.5}, "--calib-size"),
    ({"repair_shrinkage": float("nan")}, "--repair-shrinkage"),
    ({"workers": -1}, "--workers"),
    ({"preprocess": {"std": [0, 0, 0]}}, "--std"),
    ({"preprocess": {"input_size": 0}}, "--input-size"),
    ({"preprocess": {"colour": 1}}, "colour"),
    ({"force": "yes"}, "'force'"),
    (["not", "an", "object"], "JSON object"),
]


@pytest.mark.parametrize("config,needle", BAD_CONFIGS, ids=[json.dumps(c) for c, _ in BAD_CONFIGS])
def test_bad_config_files_name_the_key(capsys, tmp_path, no_heavy_work, config, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    refused(capsys, run_args(tmp_path / "out", "--config", str(path), **{"--calib-size": None, "--seed": None}), needle)


def test_output_whose_parent_is_a_file_is_refused_before_any_work(capsys, tmp_path, no_heavy_work):
    (tmp_path / "afile").write_text("x")
    refused(capsys, run_args(tmp_path / "afile" / "out"), "is a file")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_parent_is_refused_before_any_work(capsys, tmp_path, no_heavy_work):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(capsys, run_args(locked / "out"), "not writable")
    finally:
        locked.chmod(0o755)


def test_diagnose_refuses_fractional_counts_and_bad_numbers(capsys, tmp_path):
    base = ["diagnose", "--model", "cifar10-resnet20", "--calib", str(CIFAR / "train"), "--sparsity", "0.5", "--out", str(tmp_path / "d")]
    refused(capsys, base + ["--calib-size", "1.5"], "--calib-size")
    refused(capsys, base + ["--shrinkage", "nan"], "--shrinkage")
    refused(capsys, base + ["--seed", "-3"], "--seed")
    refused(capsys, base + ["--include", "("], "--include")
    assert not (tmp_path / "d").exists()


def test_compare_refuses_bad_values_before_any_work(capsys, tmp_path, monkeypatch):
    import starfish.experiments.run

    monkeypatch.setattr(starfish.experiments.run, "build_model", lambda *a: (_ for _ in ()).throw(AssertionError("heavy work")))
    base = ["compare", "--model", "cifar10-resnet20", "--calib", str(CIFAR / "train"), "--eval", str(CIFAR / "test"), "--out", str(tmp_path / "c")]
    refused(capsys, base + ["--sparsities", "0.5,nan"], "--sparsities")
    refused(capsys, base + ["--calib-size", "nan"], "--calib-size")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"repair_shrinkage": float("nan")}))
    refused(capsys, base + ["--config", str(cfg)], "--repair-shrinkage")


# --- 8. interruptions and what killed runs leave behind ------------------------------------------


def test_results_set_aside_by_a_killed_replacement_are_restored(capsys, tmp_path, first_run):
    """Killed between moving the old results aside and moving the new ones in: nothing is lost."""
    first = copy_of(first_run, tmp_path)
    report = (first / "report.json").read_text()
    first.rename(tmp_path / ".r.old-999999999")
    (tmp_path / ".r.partial-999999999").mkdir()
    refused(capsys, run_args(first), "already exists")
    assert (first / "report.json").read_text() == report
    no_debris(tmp_path, "r")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_a_failed_replacement_keeps_the_previous_results(tmp_path, first_run, interrupt):
    out = copy_of(first_run, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(interrupt):
        with atomic_output_dir(out, force=True) as scratch:
            (scratch / "model.safetensors").write_text("half written")
            raise interrupt()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    no_debris(tmp_path, "r")


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(tmp_path, shared):
    out = tmp_path / "slow"
    args = run_args(out, "--epochs", "50", "--batch-size", "8", **{"--healer": "starfish", "--calib-size": "64"})
    proc = subprocess.Popen([sys.executable, "-m", "starfish", *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"})
    lock = tmp_path / ".slow.lock"
    deadline = time.time() + 120
    while not lock.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), "the run never took its output lock"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".slow")]


# --- 9. outputs never land inside an input ------------------------------------------------------------


def test_output_inside_an_input_folder_is_refused(capsys, tmp_path, no_heavy_work):
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in sorted((CIFAR / "train" / "cat").iterdir())[:8]:
        shutil.copy(p, calib / p.name)
    before = sorted(p.name for p in calib.iterdir())
    refused(capsys, run_args(calib / "runs" / "r", **{"--calib": str(calib)}), "inside the input folder")
    assert sorted(p.name for p in calib.iterdir()) == before


# --- 11. byte-reproducible files ------------------------------------------------------------------------


def test_safetensors_outputs_are_byte_reproducible(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    masks = Masks({"0.weight": torch.rand(4, 3, 3, 3) > 0.5, "3.weight": torch.rand(2, 4) > 0.5})
    digests = set()
    for i in range(8):
        save_weights(model, tmp_path / f"m{i}.safetensors")
        masks.save(tmp_path / f"k{i}.safetensors")
        digests.add((hashlib.sha256((tmp_path / f"m{i}.safetensors").read_bytes()).hexdigest(),
                     hashlib.sha256((tmp_path / f"k{i}.safetensors").read_bytes()).hexdigest()))
    assert len(digests) == 1
    assert Masks.load(tmp_path / "k0.safetensors").names() == ["0.weight", "3.weight"]


def test_config_file_problems_are_one_line_errors(capsys, tmp_path, first_run, no_heavy_work):
    refused(capsys, run_args(tmp_path / "o", "--config", str(tmp_path)), "cannot read config file")
    binary = tmp_path / "cfg.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    refused(capsys, run_args(tmp_path / "o", "--config", str(binary)), "config file")
    rerun = copy_of(first_run, tmp_path)
    refused(capsys, run_args(rerun, "--force", "--config", str(rerun / "config.json")), "would overwrite the input")
    assert (rerun / "config.json").is_file()
