"""Label-free pipeline choice (``--pipeline auto``): probe candidate pruners, allocations and repairs
with a short heal each, rank them on held-out unlabeled samples, and let the run finish the best.

Why: the best pipeline differs by network (``benchmarks/SWEEP.md``: Wanda + variance matching on the
ViT at 90%, LAMP or ERK allocation on ResNet-20), and nobody should need a sweep scored with test
labels to find it. starfish has a label-free signal: how well the sparse network's blocks align
with the dense ones on held-out unlabeled samples, the same value ``--budget auto`` watches.

Each probe prunes a fresh copy of the dense model, applies its repair and heals it for
``probe_epochs`` epochs with the run's own healer and settings; it is ranked by its held-out output
KL(dense ‖ sparse) or its best held-out healing objective (``resolve_probe_signal``), lower is
better. The search is greedy by coordinates, to keep the probes few (``greedy_search``): every
pruner × repair at the first allocation, then the remaining allocations with the winner's pruner
and repair. No label and no
evaluation sample is read (the evaluation set is opened only for the final scoring).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from starfish.nn.batch import Batch
from starfish.models import LoadedModel
from starfish.experiments.modality import modality_of
from starfish.common.validation import PIPELINE_DIMENSIONS as DIMENSIONS

DEFAULT_PRUNERS = ("magnitude", "wanda", "sparsegpt")
DEFAULT_ALLOCATIONS = ("uniform", "erk", "lamp")
DEFAULT_REPAIRS = ("none", "varmatch")


def resolve_probe_signal(name: str, model: nn.Module) -> tuple[str, str]:
    """What candidates are ranked by, and why. ``auto``: the output KL on held-out samples, except
    for networks with BatchNorm, ranked by the held-out healing objective. Measured against test
    labels over the sweep cells (benchmarks/PIPELINE_CHOICE.md): on the ViT the per-block objective
    prefers SparseGPT's layer-wise reconstruction, which the head does not reward (Spearman 0.60
    at 90%, its pick 17.6 points below the best cell) while the KL picks the best cell (0.94); on
    ResNet-20 at 90-96% the KL after a 3-epoch heal ranks the cells almost at random (0.08-0.23)
    while the objective follows them (0.48-0.79)."""
    from starfish.repair import has_batchnorm

    if name != "auto":
        return name, "as requested"
    if has_batchnorm(model):
        return "objective", "auto: a network with BatchNorm (the short-heal output KL ranked ResNet-20 pipelines poorly)"
    return "kl", "auto: held-out output KL (the per-block objective favoured layer-wise reconstruction on the ViT)"


@dataclass(frozen=True)
class Candidate:
    pruner: str
    allocation: str
    repair: str

    def to_dict(self) -> dict:
        return {"pruner": self.pruner, "allocation": self.allocation, "repair": self.repair}


@dataclass
class Probe:
    """One candidate after its short heal: the held-out signal it reached and what it cost."""

    candidate: Candidate
    objective: float  # best held-out monitored value during the short heal (the healing objective)
    start: float  # that value before healing (after pruning and repair)
    monitor: str  # "objective" or "kl" (what the stopping rule watched)
    kl: float | None  # KL(dense ‖ sparse) of the model's outputs on the held-out samples after the short heal
    seconds: float
    steps: int

    def signal(self, rank_by: str) -> float:
        """The value candidates are ranked by (lower is better); the objective where no KL was measured."""
        value = self.kl if rank_by == "kl" and self.kl is not None else self.objective
        return value if math.isfinite(value) else math.inf

    def to_dict(self, rank_by: str) -> dict:
        return {**self.candidate.to_dict(), "signal": self.signal(rank_by), "objective": self.objective, "start": self.start,
                "monitor": self.monitor, "kl": self.kl, "seconds": self.seconds, "steps": self.steps}


@dataclass
class PipelineChoice:
    """What ``--pipeline auto`` tried and what it picked, for the report."""

    probe_epochs: int
    holdout: str
    rank_by: str = "kl"  # "kl" or "objective" (resolve_probe_signal)
    rank_reason: str = ""
    probes: list[Probe] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def best(self) -> Probe:
        return min(self.probes, key=lambda p: p.signal(self.rank_by))

    def apply(self, config):
        """The run's config with the chosen pruner, allocation and repair."""
        chosen = self.best.candidate
        return replace(config.with_prune(pruner=chosen.pruner, allocation=chosen.allocation), repair=chosen.repair)

    def to_dict(self) -> dict:
        return {
            "mode": "auto", "probe_epochs": self.probe_epochs, "rank_by": self.rank_by, "rank_reason": self.rank_reason, "holdout": self.holdout, "seconds": self.seconds,
            "search": "every pruner x repair at the first allocation, then the other allocations with the best of those",
            "chosen": self.best.candidate.to_dict(), "candidates": [p.to_dict(self.rank_by) for p in self.probes],
        }


def candidate_lists(config, loaded: LoadedModel) -> dict[str, list[str]]:
    """The values each dimension may take: the run's ``candidates`` where given, else what applies to
    the model (a language model: the pruners only, uniform allocation, no repair; an N:M pattern:
    uniform allocation, since the pattern fixes every layer's sparsity)."""
    given = dict(config.candidates or {})
    kind = modality_of(loaded).candidate_defaults(config.prune.pattern)
    defaults = {
        "pruner": list(DEFAULT_PRUNERS),
        "allocation": kind["allocation"] or list(DEFAULT_ALLOCATIONS),
        "repair": kind["repair"] or list(DEFAULT_REPAIRS),
    }
    return {dim: list(given.get(dim) or defaults[dim]) for dim in DIMENSIONS}


def greedy_search(lists: dict[str, list[str]], measure: Callable[[Candidate], float]) -> list[Candidate]:
    """The candidates ``--pipeline auto`` measures, in order: every pruner x repair at the first
    allocation, then the other allocations with the pruner and repair that measured lowest."""
    first = [Candidate(p, lists["allocation"][0], r) for p in lists["pruner"] for r in lists["repair"]]
    values = {c: measure(c) for c in first}
    leader = min(first, key=values.__getitem__)
    rest = [replace(leader, allocation=a) for a in lists["allocation"][1:]]
    for candidate in rest:
        measure(candidate)
    return first + rest


def choose_pipeline(config, loaded: LoadedModel, data, progress=None) -> PipelineChoice:
    """Probe the candidates (``greedy_search``) and return the record; ``choice.apply(config)``
    gives the config the run then finishes with."""
    held_source = data.held.source if data.held is not None else "a seeded part of the calibration set"
    choice = PipelineChoice(config.probe_epochs, held_source, *resolve_probe_signal(config.probe_signal, loaded.module))
    started = time.perf_counter()

    def measure(candidate: Candidate) -> float:
        choice.probes.append(probe(config, loaded, data, candidate, progress))
        return choice.probes[-1].signal(choice.rank_by)

    greedy_search(candidate_lists(config, loaded), measure)
    choice.seconds = time.perf_counter() - started
    return choice


def probe(config, loaded: LoadedModel, data, candidate: Candidate, progress=None) -> Probe:
    """Prune, repair and briefly heal one candidate from the dense model; its best held-out value."""
    from starfish.experiments.steps import check_masks, heal_step, prune_step, repair_step

    trial = replace(config.with_prune(pruner=candidate.pruner, allocation=candidate.allocation), repair=candidate.repair)
    short = replace(
        config.heal, budget="auto", max_epochs=config.probe_epochs, eval_every=1, patience=config.probe_epochs + 1, progress=False,
    )
    started = time.perf_counter()
    dense = loaded.module
    sparse, masks, _, _ = prune_step(trial, dense, data.calibration)
    repair_step(candidate.repair, dense, sparse, masks, data.calibration, shrinkage=config.repair_shrinkage)
    result = heal_step(dense, sparse, masks, data.calibration, short, config.prune.blocks or loaded.block_pattern, config.seed, held=data.held)
    check_masks(masks, sparse, f"after probing {candidate}")
    stopping = result.stopping or {}
    monitor = stopping.get("monitor", "objective")
    values = [p[monitor] for p in stopping.get("curve", []) if p.get(monitor) is not None]
    if not values:
        raise RuntimeError(f"probe of {candidate} measured no held-out {monitor}")
    finite = [v for v in values if math.isfinite(v)]
    step = modality_of(loaded).scoring_step
    kl = held_out_kl(dense, sparse, data.held.samples, config.heal, step) if data.held is not None else None
    out = Probe(candidate, min(finite) if finite else math.inf, values[0], monitor, kl, time.perf_counter() - started, result.steps)
    if progress is not None:
        progress(out)
    return out


@torch.no_grad()
def held_out_kl(dense: nn.Module, sparse: nn.Module, held: Batch, heal, step: int = 64) -> float:
    """Mean KL(dense ‖ sparse) of the two models' outputs on the held-out samples, in eval mode
    (per image, or per real token of a language model), on the healing device, ``step`` samples at a
    time (``Modality.scoring_step``)."""
    from starfish.nn.batch import batch_len, call_model, position_weights, select, to_device
    from starfish.nn.device import resolve_device
    from starfish.tasks.evaluate import logits_of
    from starfish.heal.objectives import Signals, kd_loss

    device = resolve_device(heal.device)
    modes = dense.training, sparse.training
    dense.to(device).eval()
    sparse.to(device).eval()
    total, n = 0.0, batch_len(held)
    try:
        for start in range(0, n, step):
            batch = to_device(select(held, slice(start, start + step)), device)
            weights = position_weights(batch)
            target = Signals([], logits_of(call_model(dense, batch)).float(), weights)
            out = Signals([], logits_of(call_model(sparse, batch)).float(), weights)
            total += float(kd_loss(out, target, None, None)) * batch_len(batch)
    finally:
        dense.train(modes[0])
        sparse.train(modes[1])
    return total / n


def fixed_record() -> dict:
    """The report's ``experiments.run`` entry of a run that took its pruner, allocation and repair as given."""
    return {"mode": "fixed"}


__all__ = ["Candidate", "PipelineChoice", "Probe", "candidate_lists", "choose_pipeline", "greedy_search"]
