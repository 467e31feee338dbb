"""The main job as one verb: ``run(RunConfig) -> report``.

build -> load data -> prune -> (optional repair) -> heal -> evaluate dense, pruned, repaired and
healed on the same streamed images (``starfish.steps``), then write weights, masks, the resolved
config and the reports atomically.
"""

from __future__ import annotations

import platform

import torch

from starfish.alignment import AlignmentProbe
from starfish.heal import HealResult
from starfish.masks import Masks
from starfish.models import LoadedModel
from starfish.outputs import atomic_output_dir, save_weights, write_json
from starfish.repair import resolve_repair
from starfish.run_config import RunConfig, validate
from starfish.steps import RunData, build_model, check_masks, evaluation, heal_step, load_data, prune_step, repair_step

__all__ = ["RunConfig", "build_model", "build_report", "run", "validate"]


def _versions() -> dict:
    import torchvision

    from starfish.version import __version__

    return {
        "starfish": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run(config: RunConfig, command: str | None = None) -> dict:
    """Run the whole job; returns the report (also written to ``config.out`` when set)."""
    validate(config)
    loaded = build_model(config)
    data = load_data(config, loaded)
    dense = loaded.module
    scoring = evaluation(config, data, dense)

    def score(label: str, model: torch.nn.Module) -> None:
        if scoring is not None:
            scoring.score(label, model)

    score("dense", dense)
    sparse, masks, prune_notes, prune_seconds = prune_step(config, dense, data.calibration)
    score("pruned", sparse)
    trained = config.heal.healer != "none"
    repair, repair_reason = resolve_repair(config.repair, sparse, trained, config.heal.bn_mode, data.calibration is not None)
    repair_stats = repair_step(repair, dense, sparse, masks, data.calibration, shrinkage=config.repair_shrinkage)
    if repair != "none":
        score("repaired", sparse)
    probe = AlignmentProbe.choose(data.evaluation, data.calibration, config.seed)
    block_pattern = config.prune.blocks or loaded.block_pattern
    device = config.heal.device
    align_before = probe.measure(dense, sparse, block_pattern, device) if probe else None

    heal_result = None
    if trained:
        heal_result = heal_step(dense, sparse, masks, data.calibration, config.heal, block_pattern, config.seed)
        score("healed", sparse)
    check_masks(masks, sparse, "after healing")

    scores = scoring.scores if scoring is not None else {}
    report = build_report(config, loaded, masks, data, scores, heal_result, prune_seconds, command)
    report["repair"] = repair
    report["repair_requested"] = config.repair
    report["repair_reason"] = repair_reason
    report["repair_stats"] = repair_stats
    report["heal_from"] = config.heal_from
    if "rr" in prune_notes:
        report["relative_repairability"] = prune_notes["rr"]
    if probe is not None and align_before is not None:
        report["alignment"] = {"images": probe.source, "before": align_before, "after": probe.measure(dense, sparse, block_pattern, device)}
    if config.out is not None:
        write_run(config, report, sparse, masks, heal_result)
    return report


def write_run(config: RunConfig, report: dict, sparse: torch.nn.Module, masks: Masks, heal_result: HealResult | None) -> None:
    """Weights, masks, config.json (without out/force), reports and plots, appearing together."""
    from starfish.report import render_markdown
    from starfish.run_plots import write_run_plots

    with atomic_output_dir(config.out, config.force) as scratch:
        report["plots"] = write_run_plots(scratch, report, heal_result.loss_history if heal_result else None)
        save_weights(sparse, scratch / "model.safetensors")
        masks.save(scratch / "masks.safetensors")
        write_json(scratch / "config.json", config.saved_dict())
        write_json(scratch / "report.json", report)
        if heal_result is not None:
            write_json(scratch / "heal_history.json", {"loss": heal_result.loss_history, "lr": heal_result.lr_history})
        (scratch / "report.md").write_text(render_markdown(report))


def build_report(
    config: RunConfig,
    loaded: LoadedModel,
    masks: Masks,
    data: RunData,
    scores: dict[str, dict],
    heal_result: HealResult | None,
    prune_seconds: float,
    command: str | None,
) -> dict:
    """The report of one run from the scores of its evaluation task (``{label: metrics}``)."""
    final = next((label for label in ("healed", "repaired", "pruned") if label in scores), None)
    top1 = {"dense": None, "pruned": None, "healed": None}
    fidelity = {}
    if scores:
        top1 = {"dense": scores["dense"].get("top1"), "pruned": scores["pruned"].get("top1"), "healed": scores[final].get("top1")}
        if "repaired" in scores:
            top1["repaired"] = scores["repaired"].get("top1")
        for label, source in (("pruned", "pruned"), ("healed", final)):
            if "agreement" in scores[source]:
                fidelity[label] = {"agreement": scores[source]["agreement"], "kl": scores[source]["kl"]}
    recovered = top1["healed"] / top1["dense"] if top1["dense"] and top1["healed"] is not None else None
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
        "task": config.task,
        "metrics": scores,
        "heal_seconds": heal_result.seconds if heal_result else 0.0,
        "prune_seconds": prune_seconds,
        "heal": {**config.heal.to_dict(), **(heal_result.to_dict() if heal_result else {})},
        "peak_memory_mb": heal_result.peak_memory_mb if heal_result else None,
        "memory_measure": heal_result.memory_measure if heal_result else None,
        "calibration": {"source": config.calib, "size": data.calib_size, "seed": config.seed},
        "eval": {"source": config.eval, "size": data.eval_size, "seed": config.seed, "class_balanced": True},
        "prunable_weights": masks.numel(),
        "layer_sparsity": masks.layer_sparsity(),
        "preprocess": loaded.preprocess.to_dict(),
        "model_notes": {k: v for k, v in loaded.extra.items() if isinstance(v, str)},
        "model_notes": dict(loaded.extra),
        "command": command,
        "versions": _versions(),
    }
