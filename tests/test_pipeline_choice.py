"""--pipeline auto: candidates probed with a short heal, ranked label-free, the best finished."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import CIFAR, WEIGHTS
from starfish.cli import build_parser, config_from_args
from starfish.heal import HealConfig
from starfish.masks import Masks
from starfish.experiments.run import RunConfig, run
from starfish.pruning import PruneConfig
from test_cli import assert_refused, run_args

CANDIDATES = {"pruner": ["magnitude", "wanda"], "allocation": ["uniform", "lamp"], "repair": ["none", "varmatch"]}


def _auto_run(out, **changes) -> RunConfig:
    fields = dict(
        model="cifar10-resnet20", weights=str(WEIGHTS["cifar10-resnet20"]), calib=str(CIFAR / "train"), calib_size=32,
        holdout_size=16, eval=str(CIFAR / "test"), eval_size=40, prune=PruneConfig(sparsity=0.8), pipeline="auto",
        candidates=CANDIDATES, probe_epochs=1,
        heal=HealConfig(budget="auto", max_epochs=2, eval_every=1, batch_size=16, progress=False, device="cpu"),
        out=str(out) if out else None,
    )
    return RunConfig(**{**fields, **changes})


@pytest.mark.slow
def test_auto_finishes_the_candidate_with_the_lowest_held_out_signal_before_reading_the_evaluation_set(tmp_path, shared, monkeypatch):
    """Greedy search: every pruner x repair at the first allocation, then the leader's other
    allocations; the run finishes the lowest held-out signal; the evaluation folder is opened only
    after the last probe; the result equals a fixed run of the chosen pipeline."""
    import PIL.Image

    import starfish.experiments.pipeline_choice as choice_module

    eval_root = str((CIFAR / "test").resolve())
    events: list[tuple[str, str]] = []
    real_open, real_probe = PIL.Image.open, choice_module.probe

    def recording_open(fp, *args, **kwargs):
        path = os.fspath(fp) if isinstance(fp, (str, os.PathLike)) else str(getattr(fp, "name", ""))
        events.append(("open", str(Path(path).resolve())))
        return real_open(fp, *args, **kwargs)

    def recording_probe(*args, **kwargs):
        result = real_probe(*args, **kwargs)
        events.append(("probe", ""))
        return result

    monkeypatch.setattr(PIL.Image, "open", recording_open)
    monkeypatch.setattr(choice_module, "probe", recording_probe)
    report = run(_auto_run(tmp_path / "auto"))
    monkeypatch.undo()

    choice = report["pipeline"]
    tried = [(c["pruner"], c["allocation"], c["repair"]) for c in choice["candidates"]]
    assert tried[:4] == [("magnitude", "uniform", "none"), ("magnitude", "uniform", "varmatch"), ("wanda", "uniform", "none"), ("wanda", "uniform", "varmatch")]
    leader = min(choice["candidates"][:4], key=lambda c: c["signal"])
    assert tried[4] == (leader["pruner"], "lamp", leader["repair"]) and len(tried) == 5
    best = min(choice["candidates"], key=lambda c: c["signal"])
    assert choice["chosen"] == {k: best[k] for k in ("pruner", "allocation", "repair")}
    assert all(c["monitor"] == "objective" and c["steps"] == 2 and c["objective"] <= c["start"] for c in choice["candidates"])
    # ResNet-20 has BatchNorm: ranked by the held-out objective; the output KL is measured and reported too
    assert choice["rank_by"] == "objective" and all(c["signal"] == c["objective"] and c["kl"] > 0 for c in choice["candidates"])
    assert len({round(c["signal"], 9) for c in choice["candidates"]}) > 1  # the probes measured different things
    assert (report["pruner"], report["allocation"], report["repair"]) == tuple(choice["chosen"].values())

    names = [e[0] for e in events]
    last_probe = max(i for i, n in enumerate(names) if n == "probe")
    first_eval = min(i for i, (n, p) in enumerate(events) if n == "open" and p.startswith(eval_root))
    assert first_eval > last_probe, "an evaluation image was opened before the pipeline was chosen"
    assert "## Pipeline choice (auto, label-free)" in (tmp_path / "auto" / "report.md").read_text()
    import json

    saved = json.loads((tmp_path / "auto" / "config.json").read_text())  # the request, so a rerun chooses again
    assert saved["pipeline"] == "auto" and saved["candidates"] == CANDIDATES and saved["prune"]["pruner"] == "magnitude"

    # the sparsity contract holds for the finished model, and it is what a fixed run of the choice gives
    from safetensors.torch import load_file

    masks = Masks.load(tmp_path / "auto" / "masks.safetensors")
    weights = load_file(tmp_path / "auto" / "model.safetensors")
    assert masks.sparsity() == pytest.approx(0.8, abs=1e-6)
    assert all(torch.count_nonzero(weights[name][~keep]) == 0 for name, keep in masks.items())
    chosen = choice["chosen"]
    fixed = run(_auto_run(tmp_path / "fixed", pipeline="fixed", candidates=None, repair=chosen["repair"],
                          prune=PruneConfig(sparsity=0.8, pruner=chosen["pruner"], allocation=chosen["allocation"])))
    assert fixed["pipeline"] == {"mode": "fixed"}
    assert fixed["metrics"]["healed"]["top1"] == report["metrics"]["healed"]["top1"]
    assert fixed["heal"]["stopping"]["curve"] == report["heal"]["stopping"]["curve"]


def test_named_flags_fix_their_dimension_and_lists_are_taken_as_given(tmp_path):
    parser = build_parser()
    args = parser.parse_args(run_args(tmp_path / "o", **{"--pipeline": "auto", "--pruner": "wanda", "--try-repairs": "none,varmatch"}))
    config = config_from_args(args)
    assert config.pipeline == "auto" and config.candidates == {"pruner": ["wanda"], "repair": ["none", "varmatch"]}
    fixed = config_from_args(parser.parse_args(run_args(tmp_path / "o", **{"--pruner": "wanda"})))
    assert fixed.pipeline == "fixed" and fixed.candidates is None


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"--pipeline": "auto", "--try-pruners": "magnitude,bogus"}, "unknown pruner 'bogus'"),
        ({"--pipeline": "auto", "--try-allocations": "uniform,tiny"}, "unknown allocation 'tiny'"),
        ({"--pipeline": "auto", "--try-repairs": "auto"}, "unknown repair 'auto'"),
        ({"--pipeline": "auto", "--healer": "none"}, "--pipeline auto ranks candidates by a short heal"),
        ({"--pipeline": "auto", "--heal-scope": "blockwise"}, "--heal-scope joint"),
        ({"--pipeline": "auto", "--probe-epochs": "0"}, "--probe-epochs"),
        ({"--pipeline": "auto", "--probe-signal": "loss"}, "--probe-signal"),
    ],
)
def test_bad_pipeline_settings_are_refused_in_one_line_before_any_work(capsys, tmp_path, shared, extra, needle):
    out = tmp_path / "out"
    assert_refused(capsys, run_args(out, **extra), needle, out)


def test_probe_signal_auto_ranks_batchnorm_networks_by_the_objective_and_others_by_the_kl():
    from starfish.experiments.pipeline_choice import resolve_probe_signal

    with_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    without = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert resolve_probe_signal("auto", with_bn)[0] == "objective"
    assert resolve_probe_signal("auto", without)[0] == "kl"
    assert resolve_probe_signal("kl", with_bn) == ("kl", "as requested")


def test_held_out_kl_is_the_mean_output_kl_in_eval_mode_and_restores_modes():
    from starfish.experiments.pipeline_choice import held_out_kl

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 3))
    sparse = copy_of(dense)
    with torch.no_grad():
        sparse[2].weight.mul_(0.3)
    held = {"pixel_values": torch.randn(70, 5)}  # more than one batch of 64
    dense.train()
    heal = HealConfig(device="cpu")
    assert held_out_kl(dense, copy_of(dense), held, heal) == pytest.approx(0.0, abs=1e-7)
    value = held_out_kl(dense, sparse, held, heal)
    assert dense.training and sparse.training  # modes come back (dropout would have made the KL random)
    dense.eval(), sparse.eval()
    p = torch.log_softmax(dense(held["pixel_values"]), -1)
    q = torch.log_softmax(sparse(held["pixel_values"]), -1)
    assert value == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean().detach()), rel=1e-5) and value > 0


def copy_of(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module)
