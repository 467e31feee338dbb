"""`starfish run` writes its loss curve and per-block alignment plots and embeds them in report.md."""

from __future__ import annotations

import pytest
import json

from conftest import CIFAR, WEIGHTS
from starfish.heal import HealConfig
from starfish.experiments.run import RunConfig, run
from starfish.pruning import PruneConfig


@pytest.mark.slow
def test_run_writes_plots_alignment_and_full_protocol(tmp_path, shared):
    out = tmp_path / "run"
    config = RunConfig(
        model="cifar10-resnet20",
        weights=str(WEIGHTS["cifar10-resnet20"]),
        calib=str(CIFAR / "train"),
        calib_size=32,
        eval=str(CIFAR / "test"),
        eval_size=100,
        prune=PruneConfig(sparsity=0.8),
        heal=HealConfig(max_steps=3, batch_size=16, progress=False),
        out=str(out),
    )
    report = run(config, command="starfish run ...")
    assert report["plots"] == ["loss_curve.png", "block_alignment.png"]
    for name in report["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    align = report["alignment"]
    assert list(align["before"]) == report["heal"]["blocks"] and len(align["before"]) == 9
    assert all(-1.0 <= v <= 1.0 for v in [*align["before"].values(), *align["after"].values()])
    assert align["after"] != align["before"]  # healing moved the blocks
    md = (out / "report.md").read_text()
    assert "![Healing loss per optimizer step](loss_curve.png)" in md and "(block_alignment.png)" in md
    for needle in (report["weights_sha256"], "32 images from", "100 images from", "Preprocessing:", "3 optimizer steps", "torch "):
        assert needle in md, needle
    assert json.loads((out / "report.json").read_text())["plots"] == report["plots"]
