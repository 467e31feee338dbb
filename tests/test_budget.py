"""Label-free stopping (--budget auto) and the rule that no choice reads the evaluation set."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import CIFAR, WEIGHTS
from starfish.cli import build_parser, config_from_args
from starfish.errors import StarfishError
from starfish.heal import HealConfig, heal
from starfish.heal.training import total_steps, train_steps
from starfish.heal.stopping import HeldOutMonitor, StoppingRecord, held_out_evaluator, split_calibration
from starfish.masks import Masks
from starfish.experiments.run import RunConfig, run
from starfish.pruning import PruneConfig, prune


def _tiny_masked_linear(seed: int = 0) -> tuple[nn.Module, Masks]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    masks = Masks({"0.weight": torch.rand(6, 6) > 0.5, "2.weight": torch.rand(3, 6) > 0.5})
    masks.apply_(model)
    return model, masks


def test_auto_stops_on_a_plateau_and_restores_the_best_held_out_weights():
    """A scripted held-out curve (best at the second evaluation, then worse): healing stops after
    ``patience`` worse evaluations and the weights of the best evaluation come back exactly."""
    model, masks = _tiny_masked_linear()
    x, y = torch.randn(40, 6), torch.randn(40, 3)
    config = HealConfig(budget="auto", max_epochs=30, patience=3, eval_every=1, batch_size=8, lr=1e-2, progress=False, device="cpu")
    script = iter([1.0, 0.5, 0.6, 0.55, 0.7, 0.1, 0.1])  # 0.1 would come only if it failed to stop
    seen: list[dict[str, torch.Tensor]] = []

    def evaluate() -> dict[str, float]:
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"objective": next(script), "kl": 0.0}

    record = StoppingRecord("objective", "scripted", 0, config.max_epochs, config.patience)
    steps_per_epoch = math.ceil(40 / 8)
    monitor = HeldOutMonitor(evaluate, dict(model.named_parameters()), torch.device("cpu"), config, steps_per_epoch, record)

    def loss_of(index):
        return ((model(x[index]) - y[index]) ** 2).mean()

    outcome = train_steps(model, masks, loss_of, 40, config, 0, "test", torch.device("cpu"), monitor=monitor)
    assert outcome.steps == 4 * steps_per_epoch  # evaluations at epochs 0..4: best at 1, three worse after it
    assert [p.epoch for p in record.curve] == [0, 1, 2, 3, 4]
    assert record.best_epoch == 1 and record.best_step == steps_per_epoch
    assert "did not improve" in record.reason
    for name, value in model.state_dict().items():
        assert torch.equal(value, seen[1][name]), f"{name} is not the best held-out weights"
    assert not torch.equal(seen[1]["0.weight"], seen[4]["0.weight"])  # training had moved on
    assert masks.violations(model) == {}


@pytest.mark.slow
def test_auto_heal_keeps_the_best_point_of_its_real_held_out_curve(pretrained, calib_images):
    loaded = pretrained("cifar10-resnet20")
    dense, calib = loaded.module, calib_images("cifar10-resnet20", 48)
    held = calib_images("cifar10-resnet20", 64, seed=1)[:24]
    sparse = copy.deepcopy(dense)
    masks = prune(sparse, PruneConfig(sparsity=0.8))
    config = HealConfig(budget="auto", max_epochs=4, patience=2, eval_every=1, batch_size=16, lr=3e-3, progress=False, device="cpu")
    result = heal(dense, sparse, masks, calib, config, holdout=held, holdout_source="test images")
    stop = result.stopping
    assert stop is not None and stop["holdout_size"] == 24 and stop["holdout"] == "test images"
    assert result.steps <= 4 * 3 and stop["curve"][0]["step"] == 0 and stop["reason"]
    assert masks.violations(sparse) == {}
    objectives = [p["objective"] for p in stop["curve"]]
    best = min(range(len(objectives)), key=objectives.__getitem__)
    assert stop["best_step"] == stop["curve"][best]["step"]
    # the healed model now scores exactly the kept point's held-out objective
    from starfish.heal.healing import _Runner
    from starfish.heal.objectives import get_objective
    from starfish.heal.targets import TensorStore
    from starfish.nn.structure import stream_points

    points = stream_points(dense, {"pixel_values": held[:2]}, loaded.block_pattern)
    store = TensorStore("cpu", torch.float16)
    again = held_out_evaluator(
        _Runner(dense, points, torch.device("cpu")), _Runner(sparse, points, torch.device("cpu")), sparse,
        {"pixel_values": held}, get_objective("starfish"), config, store, torch.device("cpu"),
    )()
    assert again["objective"] == pytest.approx(objectives[best], rel=1e-4)


def test_fixed_budget_trains_its_epochs_and_auto_spans_max_epochs():
    model, masks = _tiny_masked_linear()
    x = torch.randn(20, 6)
    target = torch.randn(20, 3)
    fixed = HealConfig(epochs=3, batch_size=8, progress=False, device="cpu")
    assert fixed.budget == "fixed" and total_steps(20, fixed) == 9
    assert total_steps(20, HealConfig(budget="auto", max_epochs=7, batch_size=8)) == 21
    outcome = train_steps(model, masks, lambda i: ((model(x[i]) - target[i]) ** 2).mean(), 20, fixed, 0, "t", torch.device("cpu"))
    assert outcome.steps == 9 and len(outcome.lrs) == 9 and outcome.lrs[-1] == pytest.approx(fixed.min_lr)
    assert masks.violations(model) == {}


def test_budget_defaults_and_flags():
    parse = build_parser().parse_args
    assert RunConfig().heal.budget == "auto" and HealConfig().budget == "fixed"
    assert config_from_args(parse(["run"])).heal.budget == "auto"
    assert config_from_args(parse(["run", "--epochs", "3"])).heal.budget == "fixed"  # "--epochs N" means N epochs
    assert config_from_args(parse(["run", "--max-steps", "3"])).heal.budget == "fixed"
    auto = config_from_args(parse(["run", "--budget", "auto", "--epochs", "3", "--max-epochs", "9", "--patience", "2"])).heal
    assert (auto.budget, auto.max_epochs, auto.patience) == ("auto", 9, 2)
    assert config_from_args(parse(["run", "--budget", "fixed"])).heal.epochs == 10  # the published recipe
    with pytest.raises(StarfishError, match="patience"):
        HealConfig(budget="auto", patience=0).validate()


def test_split_calibration_is_seeded_and_disjoint():
    calib = {"pixel_values": torch.arange(50.0).view(50, 1)}
    train, held = split_calibration(calib, seed=0)
    assert (len(train["pixel_values"]), len(held["pixel_values"])) == (40, 10)
    assert not set(train["pixel_values"].flatten().tolist()) & set(held["pixel_values"].flatten().tolist())
    assert torch.equal(held["pixel_values"], split_calibration(calib, seed=0)[1]["pixel_values"])


def _small_run(out, **changes) -> RunConfig:
    fields = dict(
        model="cifar10-resnet20", weights=str(WEIGHTS["cifar10-resnet20"]), calib=str(CIFAR / "train"), calib_size=32,
        holdout_size=16, eval=str(CIFAR / "test"), eval_size=20, prune=PruneConfig(sparsity=0.8),
        heal=HealConfig(budget="auto", max_epochs=2, eval_every=1, batch_size=16, progress=False), out=str(out) if out else None,
    )
    return RunConfig(**{**fields, **changes})


@pytest.mark.slow
def test_evaluation_folder_is_read_only_after_every_choice(tmp_path, shared, monkeypatch):
    """Every image opened is recorded; none of the evaluation folder may be opened before healing,
    the alignment probe and the stopping rule are done, and the held-out images carry no label."""
    import PIL.Image

    import starfish.experiments.run as pipeline
    from starfish.experiments.alignment import AlignmentProbe

    eval_root = (CIFAR / "test").resolve()
    calib_root = (CIFAR / "train").resolve()
    events: list[tuple[str, str]] = []
    real_open = PIL.Image.open

    def recording_open(fp, *args, **kwargs):
        path = os.fspath(fp) if isinstance(fp, (str, os.PathLike)) else str(getattr(fp, "name", ""))
        events.append(("open", str(Path(path).resolve())))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", recording_open)
    real_heal_step, real_measure = pipeline.heal_step, AlignmentProbe.measure
    seen_held: list[dict] = []

    def recording_heal_step(*args, **kwargs):
        held = kwargs.get("held")  # experiments.run passes it by keyword
        seen_held.append(held.samples)
        result = real_heal_step(*args, **kwargs)
        events.append(("healed", ""))
        return result

    def recording_measure(self, *args, **kwargs):
        events.append(("probe", self.source))
        return real_measure(self, *args, **kwargs)

    monkeypatch.setattr(pipeline, "heal_step", recording_heal_step)
    monkeypatch.setattr(AlignmentProbe, "measure", recording_measure)
    report = run(_small_run(tmp_path / "run"))

    names = [e[0] for e in events]
    healed_at = names.index("healed")
    last_probe = max(i for i, n in enumerate(names) if n == "probe")
    first_eval = min(i for i, (n, p) in enumerate(events) if n == "open" and p.startswith(str(eval_root)))
    assert first_eval > max(healed_at, last_probe), "an evaluation image was opened before every choice was made"
    assert all("held-out" in source for n, source in events if n == "probe")
    # held-out images: inputs only, none of them an evaluation file, none of them a calibration image
    assert seen_held and "labels" not in seen_held[0] and len(seen_held[0]["pixel_values"]) == 16
    opened_before = {p for n, p in events[:healed_at] if n == "open"}
    assert opened_before and all(p.startswith(str(calib_root)) for p in opened_before)
    assert len(opened_before) == 32 + 16  # calibration and held-out draws are disjoint
    # and the scores are all there, computed at the end
    assert set(report["top1"]) >= {"dense", "pruned", "healed"} and report["top1"]["pruned"] < report["top1"]["healed"] + 1
    assert report["metrics"]["pruned"]["top1"] is not None
    # the report says why healing stopped and shows the curve
    stop = report["heal"]["stopping"]
    assert stop["reason"] and stop["curve"] and stop["holdout_size"] == 16 and "outside the calibration draw" in stop["holdout"]
    assert report["heal"]["budget"] == "auto" and "held_out_curve.png" in report["plots"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Healing budget (auto, label-free)" in md and stop["reason"] in md
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["heal"]["stopping"]["curve"] == stop["curve"]
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-6)
    # pruned, scored at the end with its state swapped back in, equals pruned scored right after pruning
    from starfish.experiments.steps import build_model, evaluation, load_data, prune_step

    monkeypatch.undo()
    config = _small_run(None)
    loaded = build_model(config)
    data = load_data(config, loaded, held_out=False)
    sparse = prune_step(config, loaded.module, data.calibration)[0]
    scoring = evaluation(config, data, loaded)
    scoring.score("dense", loaded.module)
    direct = scoring.score("pruned", sparse)
    assert report["metrics"]["pruned"]["top1"] == direct["top1"] and report["metrics"]["pruned"]["kl"] == pytest.approx(direct["kl"])


def test_holdout_may_not_be_the_evaluation_folder(tmp_path, shared):
    with pytest.raises(StarfishError, match="evaluation files"):
        run(_small_run(tmp_path / "x", holdout=str(CIFAR / "test")))
