"""`starfish compare`: every healer starts from the same pruned weights, sees the same images,
keeps the mask contract, and the outputs (json, markdown, plots) are complete."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CIFAR, WEIGHTS
from starfish import StarfishError
from starfish.cli import main
from starfish.experiments.compare import compare, default_healers, parse_healers
from starfish.experiments.run import RunConfig
from starfish.heal import HealConfig

HEALERS = ["none", "bn", "varmatch", "starfish", "kd", "finetune", "nmse"]
ROW_KEYS = {"healer", "sparsity", "top1", "recovered_fraction", "heal_seconds", "uses_labels"}


def small_config(out=None, **heal) -> RunConfig:
    return RunConfig(
        model="cifar10-resnet20",
        weights=str(WEIGHTS["cifar10-resnet20"]),
        calib=str(CIFAR / "train"),
        calib_size=32,
        eval=str(CIFAR / "test"),
        eval_size=200,
        seed=0,
        heal=HealConfig(max_steps=2, batch_size=16, progress=False, **heal),
        out=str(out) if out else None,
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One small real grid, with the starting and final state of every cell recorded."""
    if not (CIFAR / "train").is_dir():
        pytest.fail("shared CIFAR-10 material missing")
    out = tmp_path_factory.mktemp("cmp") / "out"
    seen: dict = {"start": [], "end": []}

    def inspect(stage, row, model, masks):
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        seen[stage].append((row["healer"], row["sparsity"], state, masks.state_dict()))

    result = compare(small_config(out), [0.5, 0.8], HEALERS, inspect=inspect, alignment_images=64)
    return result, seen, out


@pytest.mark.slow
def test_all_healers_start_from_identical_pruned_weights(grid):
    result, seen, _ = grid
    for sparsity in (0.5, 0.8):
        starts = [(h, state, masks) for h, s, state, masks in seen["start"] if s == sparsity]
        assert [h for h, _, _ in starts] == HEALERS
        _, ref_state, ref_masks = starts[0]
        for healer, state, masks in starts[1:]:
            assert all(torch.equal(ref_state[k], state[k]) for k in ref_state), healer
            assert all(torch.equal(ref_masks[k], masks[k]) for k in ref_masks), healer
        assert len({r["start_sha256"] for r in result["rows"] if r["sparsity"] == sparsity}) == 1
    # different sparsities really are different starting points
    assert len({r["start_sha256"] for r in result["rows"]}) == 2


def test_every_row_keeps_the_mask_contract(grid):
    _, seen, _ = grid
    assert len(seen["end"]) == 2 * len(HEALERS)
    for healer, sparsity, state, masks in seen["end"]:
        for name, keep in masks.items():
            assert torch.count_nonzero(state[name][~keep]) == 0, (healer, sparsity, name)
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        assert abs((1 - kept / total) - sparsity) < 1e-3


def test_trained_healers_change_weights_and_none_does_not(grid):
    _, seen, _ = grid
    start = {(h, s): st for h, s, st, _ in seen["start"]}
    for healer, sparsity, state, _ in seen["end"]:
        changed = any(not torch.equal(start[(healer, sparsity)][k], state[k]) for k in state)
        assert changed == (healer != "none"), healer


def test_rows_and_outputs(grid):
    result, _, out = grid
    rows = json.loads((out / "compare.json").read_text())
    assert isinstance(rows, list) and len(rows) == 2 * len(HEALERS)
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["uses_labels"] == (row["healer"] == "finetune")
        assert 0.0 <= row["top1"] <= 1.0
        assert row["mask_violations"] == 0
    protocol = json.loads((out / "protocol.json").read_text())
    dense = protocol["dense_top1"]
    assert dense > 0.6  # the real pretrained ResNet-20
    for row in rows:
        assert row["recovered_fraction"] == pytest.approx(row["top1"] / dense)
    none = {r["sparsity"]: r for r in rows if r["healer"] == "none"}
    assert none[0.8]["top1"] < none[0.5]["top1"] <= dense + 0.02
    assert none[0.5]["heal_seconds"] == 0.0 and none[0.5]["steps"] == 0
    trained = [r for r in rows if r["kind"] == "heal"]
    assert len(trained) == 8 and all(r["steps"] == 2 for r in trained)  # one shared budget
    assert {r["healer"]: r["kind"] for r in rows if r["sparsity"] == 0.5}["varmatch"] == "repair"
    assert all(r["steps"] == 0 for r in rows if r["kind"] in ("repair", "prune only"))
    for name in ("accuracy_vs_sparsity.png", "block_alignment.png", "loss_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    md = (out / "compare.md").read_text()
    assert "![" in md and "(accuracy_vs_sparsity.png)" in md
    assert protocol["weights_sha256"] in md
    assert "finetune **(uses labels)**" in md
    assert "32 images from" in md and "200 images from" in md
    assert "torch " + torch.__version__ in md


@pytest.mark.slow
def test_cli_compare_contract_and_refuses_existing_out(tmp_path, shared):
    out = tmp_path / "cli"
    argv = [
        "compare", "--model", "cifar10-resnet20", "--weights", str(WEIGHTS["cifar10-resnet20"]),
        "--calib", str(CIFAR / "train"), "--calib-size", "16", "--eval", str(CIFAR / "test"), "--eval-size", "100",
        "--sparsities", "0.6", "--healers", "none,kd", "--max-steps", "1", "--seed", "0", "--no-progress", "--out", str(out),
    ]
    assert main(argv) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [(r["healer"], r["sparsity"]) for r in rows] == [("none", 0.6), ("kd", 0.6)]
    assert (out / "accuracy_vs_sparsity.png").is_file()
    assert main(argv) == 2  # exists, no --force
    assert main(argv + ["--force"]) == 0


def test_user_errors_are_one_line_starfish_errors(tmp_path, shared):
    with pytest.raises(StarfishError, match="unknown healer 'bogus'"):
        parse_healers(["none", "bogus"])
    with pytest.raises(StarfishError, match="more than once"):
        parse_healers(["kd", "kd"])
    with pytest.raises(StarfishError, match="--eval"):
        compare(RunConfig(model="cifar10-resnet20", calib=str(CIFAR / "train")), [0.5], ["kd"])
    with pytest.raises(StarfishError, match="sparsity must be"):
        compare(small_config(), [1.5], ["kd"])
    # finetune needs labels: a folder of loose images has none
    loose = tmp_path / "loose"
    loose.mkdir()
    for i, src in enumerate(sorted((CIFAR / "train" / "cat").iterdir())[:8]):
        (loose / f"{i}.jpg").write_bytes(src.read_bytes())
    config = small_config()
    config.calib, config.calib_size = str(loose), None
    with pytest.raises(StarfishError, match="finetune"):
        compare(config, [0.5], ["none", "finetune"])
    unlabeled_eval = small_config()
    unlabeled_eval.eval, unlabeled_eval.eval_size = str(loose), None
    with pytest.raises(StarfishError, match="labelled --eval"):
        compare(unlabeled_eval, [0.5], ["none"])


def test_repairs_and_repair_plus_healer_names_parse():
    specs = {s.name: s for s in parse_healers(["bn", "bn+varmatch", "varmatch+starfish", "finetune"])}
    assert specs["bn+varmatch"].repair == "bn+varmatch" and specs["bn+varmatch"].objective is None
    assert (specs["varmatch+starfish"].repair, specs["varmatch+starfish"].objective) == ("varmatch", "starfish")
    assert specs["varmatch+starfish"].kind == "repair+heal" and not specs["varmatch+starfish"].uses_labels
    assert specs["finetune"].uses_labels and specs["bn"].kind == "repair"


def test_a_healer_can_name_its_heal_scope():
    specs = {s.name: s for s in parse_healers(["starfish", "starfish@blockwise", "varmatch+nmse@blockwise", "kd@joint"])}
    assert specs["starfish"].scope is None and specs["starfish@blockwise"].scope == "blockwise"
    assert (specs["varmatch+nmse@blockwise"].repair, specs["varmatch+nmse@blockwise"].objective) == ("varmatch", "nmse")
    assert specs["kd@joint"].objective == "kd" and specs["kd@joint"].scope == "joint"
    with pytest.raises(StarfishError, match="does not use"):  # kd has no per-block signal
        parse_healers(["kd@blockwise"])
    with pytest.raises(StarfishError, match="only a trained healer"):
        parse_healers(["none@blockwise"])
    with pytest.raises(StarfishError, match="unknown heal scope 'sideways'"):
        parse_healers(["starfish@sideways"])


def test_default_healers_are_label_free():
    names = default_healers()
    assert names[0] == "none" and {"starfish", "kd", "nmse"} <= set(names) and "finetune" not in names


@pytest.mark.parametrize("healers,sparsities,allocations,needle", [
    ("starfish@blockwise@joint", "0.5", None, "more than one heal scope"),
    ("starfish,starfish@joint", "0.5", None, "names the same healer twice ('starfish' and 'starfish@joint', both heal joint)"),
    ("kd,kd", "0.5", None, "--healers names kd more than once"),
    ("none,starfish", "0.5,0.5", None, "--sparsities names 0.5 more than once"),
    ("none,starfish", "0.5", "uniform,uniform", "--allocations names uniform more than once"),
    ("starfish@", "0.5", None, "unknown heal scope ''"),
    ("@joint", "0.5", None, "unknown healer ''"),
])
def test_duplicates_and_malformed_scopes_are_refused_alike_before_any_work(healers, sparsities, allocations, needle, capsys, tmp_path, monkeypatch):
    import starfish.experiments.compare
    from test_reliability import refused

    monkeypatch.setattr(starfish.experiments.compare, "build_model", lambda *a: pytest.fail("heavy work before the refusal"))
    args = ["compare", "--model", "cifar10-resnet20", "--calib", str(tmp_path), "--eval", str(tmp_path), "--out", str(tmp_path / "c"),
            "--healers", healers, "--sparsities", sparsities, *(["--allocations", allocations] if allocations else [])]
    refused(capsys, args, needle)
    assert not (tmp_path / "c").exists()
    scoped = parse_healers(["starfish", "starfish@joint"], scope="blockwise")  # different work under --heal-scope blockwise
    assert [s.scope for s in scoped] == [None, "joint"]
