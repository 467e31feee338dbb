"""Side by side: a grid of healers x sparsities (x allocations) on one model, under one protocol.

Fairness is structural: the model, calibration images and evaluation images are loaded once; the
model is pruned once per (allocation, sparsity) and every healer gets a deep copy of those exact
weights and masks; every trained healer gets the same optimizer budget (the run's HealConfig with
only the objective swapped). A "healer" is one of
  * ``none``            - prune only;
  * a repair            - forward-only fix-ups from ``starfish.repair`` (e.g. ``bn``, ``varmatch``);
  * an objective        - a trained healer from ``starfish.heal`` (``starfish``, ``kd``, ``nmse``, ``finetune``);
  * ``REPAIR+OBJECTIVE`` - the repair first, then the trained healer (e.g. ``bn+starfish``);
  * ``OBJECTIVE@SCOPE``  - a trained healer in another heal scope than the run's ``--heal-scope``
    (e.g. ``starfish@blockwise`` beside ``starfish``), so joint and block-wise healing start from
    the same pruned weights in one grid.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import sys
import time
from dataclasses import dataclass
from typing import Callable

from torch import nn

from starfish import distributed
from starfish.nn.device import bound_heap_growth
from starfish.experiments.alignment import DenseReference, probe_sample
from starfish.nn.batch import batch_len
from starfish.distributed.sharding import collect_dropped, fsdp_active, shard_student
from starfish.errors import StarfishError
from starfish.heal.config import HEAL_SCOPES
from starfish.heal.objectives import OBJECTIVES
from starfish.masks import Masks
from starfish.experiments.run_config import RunConfig, validate
from starfish.experiments.modality import modality_of
from starfish.experiments.steps import (
    RunData, build_model, check_masks, choose_cache_dtype_step, evaluation, heal_step, language_scores, load_data, prune_step,
    repair_step, stage_calibration,
)

ALIGNMENT_IMAGES = 256  # held-out eval images used to measure per-block alignment (labels unused)

# Called as inspect(stage, row_so_far, model, masks) with stage "start" (before the healer) or "end"
# (under --distributed fsdp a healed model is sharded at "end").
Inspector = Callable[[str, dict, nn.Module, Masks], None]


def available_repairs() -> list[str]:
    """Repair names from ``starfish.repair`` (excluding its no-op ``none``); empty if not installed."""
    try:
        from starfish.repair import list_repairs
    except ImportError:
        return []
    return [r for r in list_repairs() if r != "none"]


@dataclass(frozen=True)
class HealerSpec:
    """One column of the comparison: an optional repair followed by an optional trained objective."""

    name: str
    repair: str | None = None
    objective: str | None = None
    scope: str | None = None  # None: the run's --heal-scope

    @property
    def uses_labels(self) -> bool:
        return self.objective is not None and OBJECTIVES[self.objective].uses_labels

    @property
    def kind(self) -> str:
        if self.repair and self.objective:
            return "repair+heal"
        return "repair" if self.repair else "heal" if self.objective else "prune only"


def default_healers() -> list[str]:
    """Prune only, every repair, every label-free objective on the stream; ``finetune`` (labels) and
    the norm readers (``starfish_norm``, ``starfish_kd``: models with pre-norm blocks) are opt-in."""
    trained = [n for n in ("starfish", "kd", "nmse") if n in OBJECTIVES]
    trained += sorted(n for n in OBJECTIVES if n not in trained and not OBJECTIVES[n].uses_labels and OBJECTIVES[n].reads == "stream")
    return ["none", *available_repairs(), *trained]


def parse_healer(name: str, repairs: list[str]) -> HealerSpec:
    base, at, scope = name.rpartition("@")
    if "@" in base:
        raise StarfishError(f"healer '{name}' names more than one heal scope; write one at most, e.g. starfish@blockwise.")
    if at:
        return _scoped(name, parse_healer(base, repairs), scope)
    known = ["none", *repairs, *sorted(OBJECTIVES)]
    if name == "none":
        return HealerSpec(name)
    if name in OBJECTIVES:
        return HealerSpec(name, objective=name)
    if name in repairs:  # repair names may themselves contain '+', e.g. bn+varmatch
        return HealerSpec(name, repair=name)
    head, plus, tail = name.rpartition("+")
    if plus and head in repairs and tail in OBJECTIVES:
        return HealerSpec(name, repair=head, objective=tail)
    hint = "" if repairs else " (repairs need the starfish.repair module, which is not installed)"
    raise StarfishError(
        f"unknown healer '{name}'; choose from {', '.join(known)} or REPAIR+HEALER such as "
        f"{(repairs or ['bn'])[0]}+starfish{hint}."
    )


def _scoped(name: str, spec: HealerSpec, scope: str) -> HealerSpec:
    """``spec`` healed in ``scope``; refused where there is nothing to heal or the objective has no
    per-block signal."""
    if scope not in HEAL_SCOPES:
        raise StarfishError(f"healer '{name}': unknown heal scope '{scope}'; use {' or '.join(HEAL_SCOPES)}, e.g. starfish@blockwise.")
    if spec.objective is None:
        raise StarfishError(f"healer '{name}': only a trained healer has a heal scope; write e.g. starfish@{scope}.")
    if scope == "blockwise":
        from starfish.heal.blockwise import check_blockwise

        check_blockwise(OBJECTIVES[spec.objective])
    return HealerSpec(name, repair=spec.repair, objective=spec.objective, scope=scope)


def parse_healers(names: list[str], scope: str = "joint") -> list[HealerSpec]:
    """The grid's columns; two names for the same work (``starfish`` and ``starfish@joint`` when the
    run's ``--heal-scope`` is joint) are refused like a name given twice."""
    if not names:
        raise StarfishError("--healers is empty; name at least one, e.g. --healers none,starfish,kd.")
    refuse_duplicates("--healers", names)
    repairs = available_repairs()
    specs = [parse_healer(n, repairs) for n in names]
    seen: dict[tuple, str] = {}
    for spec in specs:
        work = (spec.repair, spec.objective, (spec.scope or scope) if spec.objective else None)
        if work in seen:
            raise StarfishError(
                f"--healers names the same healer twice ('{seen[work]}' and '{spec.name}', both heal {work[2]}); list each healer once."
            )
        seen[work] = spec.name
    return specs


def refuse_duplicates(flag: str, values: list) -> None:
    """A grid axis lists each value once (a repeated one would run, and be reported, twice)."""
    dupes = sorted({str(v) for v in values if values.count(v) > 1})
    if dupes:
        raise StarfishError(f"{flag} names {', '.join(dupes)} more than once; list each value once.")


def state_fingerprint(model: nn.Module) -> str:
    """sha256 of every state-dict tensor: equal fingerprints mean bit-identical weights."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _log(text: str) -> None:
    if distributed.is_writer():  # one progress log per run, not one per rank
        print(text, file=sys.stderr, flush=True)


def validate_grid(config: RunConfig, sparsities: list[float], specs: list[HealerSpec], allocations: list[str]) -> None:
    """The run's validation of the user's config at every grid point, then what only a grid needs;
    all before any model or image is loaded."""
    if not sparsities:
        raise StarfishError("--sparsities is empty; pass e.g. --sparsities 0.5,0.75,0.9.")
    refuse_duplicates("--sparsities", list(sparsities))
    refuse_duplicates("--allocations", list(allocations))
    if config.masks:
        raise StarfishError("compare prunes at every --sparsities value itself; drop --masks.")
    if config.eval is None:
        raise StarfishError("compare scores every healer on the same images: pass --eval DIR.")
    if config.calib is None and any(s.name != "none" for s in specs):
        raise StarfishError("healers and repairs need calibration images: pass --calib DIR (or --healers none).")
    if fsdp_active():
        from starfish.distributed.fsdp import check_fsdp_scope

        for spec in specs:
            check_fsdp_scope(spec.scope or config.heal.scope)
    # Every cell is a run without its own healer or repair (the grid supplies them).
    cell = copy.deepcopy(config)
    cell.heal.healer, cell.repair = "none", "none"
    validate(cell, sparsities, allocations)


def compare(
    config: RunConfig,
    sparsities: list[float],
    healers: list[str],
    allocations: list[str] | None = None,
    command: str | None = None,
    inspect: Inspector | None = None,
    alignment_images: int = ALIGNMENT_IMAGES,
) -> dict:
    """Run the grid; returns ``{"rows": [...], "protocol": {...}, "curves": [...]}`` (and writes it under
    ``config.out`` when set). ``config`` is a RunConfig: its model, data, seed, prune and heal
    settings are shared by every cell; its sparsity and healer are replaced by the grid's."""
    specs = parse_healers(list(healers), config.heal.scope)
    allocations = list(allocations or [config.prune.allocation])
    validate_grid(config, sparsities, specs, allocations)
    bound_heap_growth()  # from the first pass on, not only while healing (``nn.device.bound_heap_growth``)

    loaded = build_model(config)
    device = config.heal.device
    block_pattern = config.prune.blocks or loaded.block_pattern
    data = load_data(config, loaded, calibration=config.calib is not None)
    if any(s.uses_labels for s in specs) and not data.calibration_labelled():
        raise StarfishError(
            "healer 'finetune' trains on labels but the calibration folder has none; "
            "use a folder with one sub-folder per class, or drop finetune from --healers."
        )
    text = modality_of(loaded).language
    if not text and not data.evaluation_labelled():
        raise StarfishError(f"evaluation folder {config.eval} has no class sub-folders, so accuracy cannot be scored; pass a labelled --eval folder.")
    if text:  # the run's probe: held-out (else calibration) sequences, never the evaluation text
        probe = modality_of(loaded).alignment_probe(data, config.seed)
        align_inputs = probe.images if probe is not None else None
    else:
        align_inputs = probe_sample(data.evaluation, config.seed, alignment_images)

    dense = loaded.module
    scoring = evaluation(config, data, loaded)
    metric = scoring.task.headline
    dense_stats = scoring.score("dense", dense)
    extra = language_scores(config, loaded, data)  # further texts and zero-shot tasks (language models)
    dense_extra = extra.score("dense", dense) if extra is not None else {}
    reference = DenseReference(dense, align_inputs, block_pattern, device=device)
    _log(f"dense {_show(metric, dense_stats.get(metric))} on {data.eval_size} {'windows' if text else 'images'}")

    # decided once, before any pruning: the target-cache dtype from the dense activations on the calibration set
    config = dataclasses.replace(config, heal=choose_cache_dtype_step(config.heal, [s.objective for s in specs if s.objective], dense, data.calibration, block_pattern))
    rows: list[dict] = []
    curves: list[dict] = []
    prunable = 0
    planned = False
    blocks: list[str] = []
    for allocation in allocations:
        for sparsity in sparsities:
            cell_config = config.with_prune(sparsity=sparsity, allocation=allocation)
            pruned, masks, notes, prune_seconds = prune_step(cell_config, dense, data.calibration)
            prunable = masks.numel()
            start = state_fingerprint(pruned)
            before = reference.alignment(pruned)
            blocks = list(before)
            cell = {"allocation": allocation, "sparsity": sparsity, "alignment_before": before, "healers": {}}
            if "rr" in notes:
                cell["relative_repairability"] = notes["rr"]
            curves.append(cell)
            if not planned and not fsdp_active():  # a grid's memory is knowable before its first heal: refuse it whole, not halfway
                _plan_grid(specs, dense, pruned, masks, data, config, block_pattern)
                planned = True
            for spec in specs:
                model = copy.deepcopy(pruned)
                own_masks = Masks(masks.state_dict())
                row: dict = {
                    "healer": spec.name,
                    "sparsity": sparsity,
                    "allocation": allocation,
                    "kind": spec.kind,
                    "uses_labels": spec.uses_labels,
                    "start_sha256": start,
                }
                if inspect:
                    inspect("start", row, model, own_masks)
                result, seconds = _apply(spec, dense, model, own_masks, data, config, block_pattern)
                stats = scoring.score(spec.name, model)
                if extra is not None:
                    row.update(extra.score(f"{spec.name}@{allocation}@{sparsity:g}", model))
                check_masks(own_masks, model, f"by healer {spec.name} at sparsity {sparsity}")
                after = reference.alignment(model)
                row.update(
                    {
                        **headline_fields(stats, dense_stats),
                        "agreement": stats.get("agreement", stats.get("top1_agreement")),
                        "kl": stats.get("kl", stats.get("kl_from_reference")),
                        "heal_seconds": seconds,
                        "prune_seconds": prune_seconds,
                        "steps": result.steps if result else 0,
                        "peak_memory_mb": result.peak_memory_mb if result else None,
                        "memory_measure": result.memory_measure if result else None,
                        "memory_at_start_mb": result.memory_at_start_mb if result else None,
                        "memory_plan_mb": result.memory_estimate["need_mb"] if result and result.memory_estimate else None,
                        "memory_plan_added_mb": result.memory_estimate["added_mb"] if result and result.memory_estimate else None,
                        "achieved_sparsity": own_masks.sparsity(),
                        "mask_violations": 0,
                        "block_cosine_mean": sum(after.values()) / len(after),
                    }
                )
                rows.append(row)
                cell["healers"][spec.name] = {
                    "uses_labels": spec.uses_labels,
                    "loss": result.loss_history if result else [],
                    "alignment_after": after,
                }
                if inspect:
                    inspect("end", row, model, own_masks)
                share = f" ({_pct(row['recovered_fraction'])} of dense)" if metric == "top1" else ""
                _log(f"{allocation:>8s} {100 * sparsity:5.1f}% {spec.name:>16s}: {_show(metric, row[metric])}{share} in {seconds:.1f} s")
                del model
                collect_dropped()  # --distributed fsdp: this grid point's sharded student is freed here
    protocol = _protocol(config, loaded, specs, sparsities, allocations, data, dense_stats, metric, prunable, blocks, align_inputs, command)
    if extra is not None:
        protocol["dense_scores"] = dense_extra
        section = extra.record()
        if "zeroshot" in section:
            protocol["zeroshot"] = section["zeroshot"]["protocol"]
        if "perplexity_by_text" in section:
            protocol["texts"] = {name: {k: v for k, v in entry.items() if k != "perplexity"} for name, entry in section["perplexity_by_text"].items()}
        extra.close()
    result = {"rows": rows, "protocol": protocol, "curves": curves}
    context = distributed.current()
    if context is not None:
        protocol["distributed"] = context.to_report()
    if config.out is not None and distributed.is_writer():
        from starfish.reporting.compare_report import write_outputs

        write_outputs(result, config.out, config.force)
    return result


def _heal_config(spec: HealerSpec, config: RunConfig):
    """The heal settings of one healer of the grid: the run's, with the spec's objective and scope."""
    heal_config = copy.deepcopy(config.heal)
    heal_config.healer = spec.objective
    if spec.scope is not None:
        heal_config.scope = spec.scope
    return heal_config


def _plan_grid(specs: list[HealerSpec], dense, pruned, masks: Masks, data: RunData, config: RunConfig, block_pattern) -> None:
    """Plan the memory of every trained healer of the grid on the first pruned cell (the plan does not
    depend on the sparsity) and refuse, before anything heals, the first that would not fit."""
    from starfish.heal.healing import plan_heal

    for spec in specs:
        if spec.objective:
            calibration = stage_calibration(data.heal_calibration, labels=spec.uses_labels, whole=True)
            plan_heal(dense, pruned, masks, calibration, _heal_config(spec, config), block_pattern).check()


def _apply(spec: HealerSpec, dense, model, masks, data: RunData, config: RunConfig, block_pattern):
    """Repair and/or heal ``model`` in place; returns (HealResult or None, seconds)."""
    started = time.perf_counter()
    result = None
    if spec.repair:
        repair_step(spec.repair, dense, model, masks, data.calibration)
    if spec.objective:
        shard_student(model, block_pattern)  # --distributed fsdp: 1/N of the student per rank; the teacher stays full
        heal_config = _heal_config(spec, config)
        result = heal_step(dense, model, masks, data.heal_calibration, heal_config, block_pattern, config.seed, held=data.held)
    return result, (time.perf_counter() - started) if (spec.repair or spec.objective) else 0.0


def headline_fields(stats: dict, dense_stats: dict) -> dict:
    """Top-1 and its share of dense for classifiers; perplexity for language models (both keys always
    present, None where the task does not measure it)."""
    top1, dense_top1 = stats.get("top1"), dense_stats.get("top1")
    return {
        "top1": top1,
        "recovered_fraction": top1 / dense_top1 if top1 is not None and dense_top1 else None,
        "perplexity": stats.get("perplexity"),
    }


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _show(metric: str, value: float | None) -> str:
    if metric == "top1":
        return f"top-1 {_pct(value)}"
    return f"{metric} {'—' if value is None else f'{value:.2f}'}"


def _protocol(config, loaded, specs, sparsities, allocations, data: RunData, dense_stats, metric, prunable, blocks, align_inputs, command) -> dict:
    import matplotlib

    from starfish.experiments.run import _versions, calibration_protocol, eval_protocol

    heal_config = config.heal.to_dict()
    heal_config.pop("healer", None)
    return {
        "model": config.model,
        "weights": config.weights,
        "weights_sha256": loaded.weights_sha256,
        "preprocess": loaded.preprocess.to_dict(),
        "metric": metric,
        "dense_top1": dense_stats.get("top1"),
        "dense_perplexity": dense_stats.get("perplexity"),
        "pruner": config.prune.pruner,
        "allocations": allocations,
        "sparsities": list(sparsities),
        "prune": {k: v for k, v in config.prune.to_dict().items() if k not in ("sparsity", "allocation")},
        "prunable_weights": prunable,
        "blocks": blocks,
        "healers": [{"name": s.name, "kind": s.kind, "uses_labels": s.uses_labels, "scope": s.scope or config.heal.scope} for s in specs],
        "heal_budget": heal_config,
        "calibration": {
            **calibration_protocol(config, loaded, data),
            "sampling": "uniform random without replacement, seeded",
            "labels": "used only by healers marked uses_labels",
        },
        "eval": eval_protocol(config, loaded, data),
        "alignment_images": {"size": batch_len(align_inputs), "from": modality_of(loaded).probe_source},
        "seed": config.seed,
        "command": command,
        "versions": {**_versions(), "matplotlib": matplotlib.__version__},
    }
