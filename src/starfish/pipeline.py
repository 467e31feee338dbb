"""The main job as one dataclass config and one verb: ``run(RunConfig) -> report``.

prune -> (optional repair) -> heal -> evaluate dense, pruned and healed on the same images,
then write weights, masks, the resolved config and the reports atomically.
"""

from __future__ import annotations

import copy
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from starfish.alignment import AlignmentProbe
from starfish.data import images_only, load_folder
from starfish.errors import StarfishError
from starfish.evaluate import Predictions, predict, summarize
from starfish.heal import HealConfig, heal
from starfish.masks import Masks
from starfish.models import LoadedModel, Preprocess, create_model
from starfish.models.registry import check_preprocess
from starfish.outputs import atomic_output_dir, check_output_dir, save_weights, write_json
from starfish.pruning import PruneConfig, prune_with_notes
from starfish.structure import find_blocks
from starfish.repair import AUTO, apply_repair, list_repairs, resolve_repair


@dataclass
class RunConfig:
    model: str = "cifar10-resnet20"
    weights: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    preprocess: dict | None = None  # overrides of the model's own preprocessing
    calib: str | None = None
    calib_size: float | None = None  # count, fraction in (0, 1), or None = the whole folder
    eval: str | None = None
    eval_size: int | None = None  # None = the whole folder
    seed: int = 0
    masks: str | None = None  # start from saved masks instead of pruning
    prune: PruneConfig = field(default_factory=PruneConfig)
    repair: str = "auto"  # label-free repair after pruning: auto | none | bn | varmatch | bn+varmatch
    repair_shrinkage: float = 0.0  # varmatch: > 0 keeps (nearly) collapsed channels from being blown up
    heal_from: str = "pruned"  # "pruned": start healing from the pruner's weights; "dense-masked": dense x mask
    heal: HealConfig = field(default_factory=HealConfig)
    out: str | None = None
    force: bool = False
    eval_batch_size: int = 256
    workers: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise StarfishError(f"config has unknown keys {unknown}; known keys: {sorted(known)}.")
        raw = dict(raw)
        raw["prune"] = PruneConfig(**raw.get("prune", {}))
        raw["heal"] = HealConfig(**raw.get("heal", {}))
        return cls(**raw)


def _versions() -> dict:
    import torchvision

    from starfish import __version__

    return {
        "starfish": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def build_model(config: RunConfig) -> LoadedModel:
    loaded = create_model(config.model, config.weights, config.pretrained, config.num_classes)
    if config.preprocess:
        merged = {**loaded.preprocess.to_dict(), **config.preprocess}
        merged["mean"], merged["std"] = tuple(merged["mean"]), tuple(merged["std"])
        loaded.preprocess = Preprocess(**merged)
    check_preprocess(loaded, config.preprocess)
    if config.prune.blocks:  # a bad --blocks fails here, before any image is read
        find_blocks(loaded.module, config.prune.blocks)
    return loaded


def validate(config: RunConfig) -> None:
    """Everything that can be checked before any work starts."""
    config.prune.validate()
    config.heal.validate()
    if config.out is not None:
        check_output_dir(config.out, config.force, (config.weights, config.calib, config.eval, config.masks))
    if config.calib is None and config.heal.healer != "none":
        raise StarfishError("healing needs calibration images: pass --calib DIR (or --healer none).")
    if config.repair not in (AUTO, *list_repairs()):
        raise StarfishError(f"unknown repair '{config.repair}'; choose one of {AUTO}, {', '.join(list_repairs())}.")
    if config.calib is None and config.repair not in ("none", AUTO):
        raise StarfishError(f"repair '{config.repair}' needs calibration images: pass --calib DIR (or --repair none).")
    if config.heal_from not in ("pruned", "dense-masked"):
        raise StarfishError(f"--heal-from must be 'pruned' or 'dense-masked'; got '{config.heal_from}'.")
    from starfish.pruning.pruners import get_pruner

    if config.calib is None and not config.masks and (get_pruner(config.prune.pruner).needs_calibration or config.prune.allocation == "rr"):
        raise StarfishError(
            f"pruner '{config.prune.pruner}' / allocation '{config.prune.allocation}' needs calibration images: pass --calib DIR."
        )


def run(config: RunConfig, command: str | None = None) -> dict:
    """Run the whole job; returns the report (also written to ``config.out`` when set)."""
    validate(config)
    loaded = build_model(config)
    transform = loaded.preprocess.transform()
    device = config.heal.device
    calib = None
    calib_size = 0
    if config.calib is not None:
        calib, _, _ = load_folder(config.calib, transform, config.calib_size, config.seed, "calibration", balanced=False, progress=config.heal.progress)
        calib_size = len(calib)
    evalset = None
    if config.eval is not None:
        evalset, _, _ = load_folder(config.eval, transform, config.eval_size, config.seed, "eval", balanced=True, progress=config.heal.progress)

    def score(model: torch.nn.Module, label: str) -> Predictions | None:
        if evalset is None:
            return None
        return predict(model, evalset, config.eval_batch_size, device, desc=f"evaluating {label}" if config.heal.progress else None, workers=config.workers)

    dense = loaded.module
    dense_pred = score(dense, "dense")
    sparse = copy.deepcopy(dense)
    started = time.perf_counter()
    prune_notes: dict = {}
    if config.masks:
        masks = Masks.load(config.masks)
        masks.apply_(sparse)
    else:
        calib_images = images_only(calib) if calib is not None else None
        masks, prune_notes = prune_with_notes(sparse, config.prune, seed=config.seed, calibration=calib_images)
    prune_seconds = time.perf_counter() - started
    if config.heal_from == "dense-masked":  # drop a reconstructing pruner's weight updates
        sparse.load_state_dict(dense.state_dict())
        masks.apply_(sparse)
    pruned_pred = score(sparse, "pruned")
    repair, repair_reason = resolve_repair(config.repair, sparse, config.heal.healer != "none", config.heal.bn_mode, calib is not None)
    repair_stats = {"repair": "none"}
    repaired_pred = None
    if repair != "none":
        repair_stats = apply_repair(repair, dense, sparse, masks, images_only(calib), shrinkage=config.repair_shrinkage)
        repaired_pred = score(sparse, "repaired")
    probe = AlignmentProbe.choose(evalset, calib, config.seed)
    block_pattern = config.prune.blocks or loaded.block_pattern
    align_before = probe.measure(dense, sparse, block_pattern, device) if probe else None

    heal_result = None
    if config.heal.healer != "none":
        heal_config = copy.deepcopy(config.heal)
        heal_config.seed = config.seed
        heal_result = heal(dense, sparse, masks, calib, heal_config, block_pattern=config.prune.blocks or loaded.block_pattern)
    healed_pred = score(sparse, "healed") if heal_result is not None else (repaired_pred or pruned_pred)

    broken = masks.violations(sparse)
    if broken:  # a bug, not a user error: the contract must hold whatever the input
        raise RuntimeError(f"mask contract violated after healing: {broken}")

    report = build_report(config, loaded, masks, calib_size, evalset, dense_pred, pruned_pred, healed_pred, heal_result, prune_seconds, command)
    report["repair"] = repair
    report["repair_requested"] = config.repair
    report["repair_reason"] = repair_reason
    report["repair_stats"] = repair_stats
    report["heal_from"] = config.heal_from
    if repaired_pred is not None:
        report["top1"]["repaired"] = summarize(repaired_pred)["top1"]
    if "rr" in prune_notes:
        report["relative_repairability"] = prune_notes["rr"]
    if probe is not None and align_before is not None:
        report["alignment"] = {"images": probe.source, "before": align_before, "after": probe.measure(dense, sparse, block_pattern, device)}
    if config.out is not None:
        from starfish.report import render_markdown

        from starfish.run_plots import write_run_plots

        with atomic_output_dir(config.out, config.force) as scratch:
            report["plots"] = write_run_plots(scratch, report, heal_result.loss_history if heal_result else None)
            save_weights(sparse, scratch / "model.safetensors")
            masks.save(scratch / "masks.safetensors")
            write_json(scratch / "config.json", config.to_dict())
            write_json(scratch / "report.json", report)
            if heal_result is not None:
                write_json(scratch / "heal_history.json", {"loss": heal_result.loss_history, "lr": heal_result.lr_history})
            (scratch / "report.md").write_text(render_markdown(report))
    return report


def build_report(config, loaded, masks, calib_size, evalset, dense_pred, pruned_pred, healed_pred, heal_result, prune_seconds, command) -> dict:
    top1 = {"dense": None, "pruned": None, "healed": None}
    fidelity = {}
    if dense_pred is not None:
        for label, pred in (("dense", dense_pred), ("pruned", pruned_pred), ("healed", healed_pred)):
            stats = summarize(pred, dense_pred if label != "dense" else None)
            top1[label] = stats["top1"]
            if label != "dense":
                fidelity[label] = {"agreement": stats["agreement"], "kl": stats["kl"]}
    recovered = top1["healed"] / top1["dense"] if top1["dense"] else None
    return {
        "model": config.model,
        "weights": config.weights,
        "weights_sha256": loaded.weights_sha256,
        "sparsity": masks.sparsity(),
        "requested_sparsity": config.prune.sparsity if not config.masks else None,
        "pruner": config.prune.pruner if not config.masks else f"masks:{config.masks}",
        "allocation": config.prune.allocation if not config.masks else None,
        "healer": config.heal.healer,
        "uses_labels": heal_result.uses_labels if heal_result else False,
        "top1": top1,
        "recovered_fraction": recovered,
        "fidelity_to_dense": fidelity,
        "heal_seconds": heal_result.seconds if heal_result else 0.0,
        "prune_seconds": prune_seconds,
        "heal": {**config.heal.to_dict(), **(heal_result.to_dict() if heal_result else {})},
        "peak_memory_mb": heal_result.peak_memory_mb if heal_result else None,
        "memory_measure": heal_result.memory_measure if heal_result else None,
        "calibration": {"source": config.calib, "size": calib_size, "seed": config.seed},
        "eval": {"source": config.eval, "size": len(evalset) if evalset is not None else 0, "seed": config.seed, "class_balanced": True},
        "prunable_weights": masks.numel(),
        "layer_sparsity": masks.layer_sparsity(),
        "preprocess": loaded.preprocess.to_dict(),
        "model_notes": dict(loaded.extra),
        "command": command,
        "versions": _versions(),
    }
