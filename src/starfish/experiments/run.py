"""The main job as one verb: ``run(RunConfig) -> report``.

build -> load data -> prune -> (optional repair) -> heal -> evaluate dense, pruned, repaired and
healed on the same streamed images (``starfish.experiments.steps``), then write weights, masks, the resolved
config and the reports atomically. The evaluation set is read only for that final scoring, after
every choice (when healing stops, the alignment probe) was made on held-out unlabeled samples.
"""

from __future__ import annotations

import platform
from dataclasses import replace

import torch

from starfish import distributed
from starfish.nn.device import bound_heap_growth
from starfish.nn.batch import Batch, select
from starfish.errors import StarfishError
from starfish.common.validation import first_non_finite
from starfish.distributed.sharding import gathered, plain_copy, shard_for_healing
from starfish.heal import HealResult
from starfish.heal.resume import Checkpointer
from starfish.masks import Masks
from starfish.models import LoadedModel
from starfish.common.outputs import atomic_output_dir, write_json
from starfish.experiments.pipeline_choice import Probe, choose_pipeline, fixed_record
from starfish.repair import AUTO, has_batchnorm, resolve_repair
from starfish.repair.bn import recalibrate_batchnorm
from starfish.experiments.run_config import RunConfig, validate
from starfish.experiments.steps import (
    LanguageScores, RunData, build_model, check_masks, choose_cache_dtype_step, evaluation, heal_step, language_scores, load_data,
    prune_step, repair_step, stage_calibration, task_name,
)
from starfish.experiments.modality import modality_of
from starfish.experiments.states import SavedState
from starfish.nn.structure import find_blocks
from starfish.tasks import Evaluation

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
    bound_heap_growth()  # from the first pass on, not only while healing (``nn.device.bound_heap_growth``)
    loaded = build_model(config)
    data = load_data(config, loaded)
    requested, choice = config, None  # config.json and checkpoints keep the request: a rerun chooses again, the same way
    if config.pipeline == "auto":  # probes on calibration and held-out samples only; the run finishes the best
        choice = choose_pipeline(config, loaded, data, progress=_say_probe if config.heal.progress else None)
        config = choice.apply(config)
    checkpointer = Checkpointer.open(requested, data.calibration)  # --checkpoint-every / --resume
    dense = loaded.module
    if config.prune.blocks and data.calibration is not None:  # a --blocks module that never runs fails before any pass
        find_blocks(dense, config.prune.blocks, select(data.calibration, slice(0, 2)), config.heal.device)
    scoring = evaluation(config, data, loaded)  # nothing of the evaluation set is read until final_scores
    # the target-cache dtype, from the dense activations on the calibration set: decided (or refused) before pruning
    config = replace(config, heal=choose_cache_dtype_step(config.heal, [config.heal.healer], dense, data.calibration, config.prune.blocks or loaded.block_pattern))
    sparse, masks, prune_notes, prune_seconds = prune_step(config, dense, data.calibration)
    trained = config.heal.healer != "none"
    repair, repair_reason = resolve_repair(config.repair, sparse, trained, config.heal.bn_mode, data.calibration is not None)
    kind_repair = modality_of(loaded).auto_repair()
    if kind_repair is not None and config.repair == AUTO:
        repair, repair_reason = kind_repair
    saved: dict[str, SavedState] = {}
    if scoring is not None and (repair != "none" or trained):
        saved["pruned"] = SavedState.changing(sparse, masks, repair_follows=repair != "none")
    repair_stats = repair_step(repair, dense, sparse, masks, data.calibration, shrinkage=config.repair_shrinkage)
    if scoring is not None and repair != "none" and trained:
        saved["repaired"] = SavedState.changing(sparse, masks, repair_follows=False)
    probe = modality_of(loaded).alignment_probe(data, config.seed)
    block_pattern = config.prune.blocks or loaded.block_pattern
    shard_for_healing(dense, sparse, block_pattern, saved.values())  # --distributed fsdp: 1/N of each model per rank from here
    device = config.heal.device
    align_before = probe.measure(dense, sparse, block_pattern, device) if probe else None

    heal_result = None
    if trained:
        heal_result = heal_step(dense, sparse, masks, data.heal_calibration, config.heal, block_pattern, config.seed, checkpointer=checkpointer, held=data.held)
    check_masks(masks, sparse, "after healing")
    align_after = probe.measure(dense, sparse, block_pattern, device) if probe is not None and align_before is not None else None
    extra = language_scores(config, loaded, data)  # further texts and zero-shot tasks (language models)
    try:
        if scoring is not None:  # every choice is made: only now is the evaluation set read
            final_scores(scoring, config, data, dense, sparse, saved, repair, trained, extra)
            check_masks(masks, sparse, "after scoring")
        scores = scoring.scores if scoring is not None else {}
        report = build_report(config, loaded, masks, data, scores, heal_result, prune_seconds, command)
        if extra is not None:
            report.update(extra.record({label: m.get("perplexity") for label, m in scores.items()}))
    finally:
        if extra is not None:
            extra.close()
    report["repair"] = repair
    report["repair_requested"] = config.repair
    report["repair_reason"] = repair_reason
    report["repair_stats"] = repair_stats
    report["heal_from"] = config.heal_from
    report["pipeline"] = choice.to_dict() if choice is not None else fixed_record()
    if checkpointer is not None and checkpointer.resumed:
        report["resumed_from_step"] = checkpointer.resumed  # heal_seconds then counts this process only
    if "rr" in prune_notes:
        report["relative_repairability"] = prune_notes["rr"]
    if probe is not None and align_before is not None:
        report["alignment"] = {"images": probe.source, "before": align_before, "after": align_after}
    context = distributed.current()
    if context is not None:
        report["distributed"] = context.to_report()
    # One writer: DDP ranks hold identical, full weights; FSDP gathers them (a collective) for rank 0.
    written = gathered(sparse) if config.out is not None else None
    if config.out is not None and distributed.is_writer():
        write_run(requested, report, written, masks, heal_result, loaded, data.generated)
    return report


def _say_probe(probe: Probe) -> None:
    """One stderr line per candidate of ``--pipeline auto``."""
    import sys

    c = probe.candidate
    sys.stderr.write(
        f"starfish: pipeline probe {c.pruner} / {c.allocation} / {c.repair}: held-out {probe.monitor} "
        f"{probe.start:.5g} -> {probe.objective:.5g}, KL {probe.kl if probe.kl is not None else float('nan'):.5g} ({probe.seconds:.1f} s)\n"
    )


def final_scores(
    scoring: Evaluation, config: RunConfig, data: RunData, dense: torch.nn.Module, sparse: torch.nn.Module,
    saved: dict[str, SavedState], repair: str, trained: bool, extra: LanguageScores | None = None,
) -> None:
    """Score dense, pruned, repaired and healed on the evaluation set, after every choice was made;
    earlier states are swapped into ``sparse`` for their pass and swapped out again. ``extra``: the
    further texts and zero-shot tasks of a language model, scored on the same states."""

    def score(label: str, model: torch.nn.Module) -> None:
        scoring.score(label, model)
        if extra is not None:
            extra.score(label, model)

    score("dense", dense)
    if reestimates_batchnorm(config, repair, dense, data):
        scoring.score("dense_bn", bn_control(dense, data))
    labels = ["pruned", *(["repaired"] if repair != "none" else []), *(["healed"] if trained else [])]
    for label in labels:
        if label in saved:
            with saved[label].swapped_in(sparse):
                score(label, sparse)
        else:  # the live state: the last step that ran
            score(label, sparse)


def reestimates_batchnorm(config: RunConfig, repair: str, dense: torch.nn.Module, data: RunData) -> bool:
    """Whether this run re-estimates BatchNorm statistics on the calibration set (a recalibrating
    repair, or healing with BatchNorm in train mode): then part of any gain is BatchNorm adaptation."""
    if data.calibration is None or not has_batchnorm(dense):
        return False
    healing_in_train_mode = config.heal.healer != "none" and config.heal.bn_mode == "train"
    return healing_in_train_mode or repair in ("bn", "bn+varmatch")


def bn_control(dense: torch.nn.Module, data: RunData) -> torch.nn.Module:
    """The dense network with its BatchNorm statistics re-estimated on the calibration set: the control
    that separates BatchNorm adaptation from what healing recovers."""
    control = plain_copy(dense)  # under --distributed fsdp gathered on every rank
    recalibrate_batchnorm(control, stage_calibration(data.calibration))
    return control


def write_run(
    config: RunConfig, report: dict, sparse: torch.nn.Module, masks: Masks, heal_result: HealResult | None, loaded: LoadedModel,
    generated: Batch | None = None,
) -> None:
    """Weights, masks, config.json (without out/force), reports and plots, appearing together. A
    causal LM is written as a Hugging Face folder (``model/``) that its own library loads as it is."""
    from starfish.reporting.report import render_markdown
    from starfish.reporting.run_plots import write_run_plots

    bad = first_non_finite(sparse.state_dict().items())
    if bad is not None:  # a last line of defence: healing checks its weights, nothing unchecked is written
        raise StarfishError(f"refusing to write {config.out}: weight '{bad}' holds NaN or inf; lower --lr or heal in float32 (--dtype float32).")
    with atomic_output_dir(config.out, config.force) as scratch:
        report["plots"] = write_run_plots(scratch, report, heal_result.loss_history if heal_result else None)
        modality_of(loaded).save_model(sparse, loaded, masks, scratch, generated)
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
        if "dense_bn" in scores:
            top1["dense_bn_reestimated"] = scores["dense_bn"].get("top1")
        for label, source in (("pruned", "pruned"), ("healed", final)):
            if "agreement" in scores[source]:
                fidelity[label] = {"agreement": scores[source]["agreement"], "kl": scores[source]["kl"]}
    perplexity = {label: scores[source].get("perplexity") for label, source in (("dense", "dense"), ("pruned", "pruned"), ("healed", final))} if scores else {}
    for label, source in (("pruned", "pruned"), ("healed", final)):
        if scores and "top1_agreement" in scores[source]:
            fidelity[label] = {"agreement": scores[source]["top1_agreement"], "kl": scores[source]["kl_from_reference"]}
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
        **({"perplexity": perplexity} if modality_of(loaded).language else {}),
        "fidelity_to_dense": fidelity,
        "task": task_name(config, loaded),
        "metrics": scores,
        "heal_seconds": heal_result.seconds if heal_result else 0.0,
        "prune_seconds": prune_seconds,
        "heal": {**config.heal.to_dict(), **(heal_result.to_dict() if heal_result else {})},
        "peak_memory_mb": heal_result.peak_memory_mb if heal_result else None,
        "memory_measure": heal_result.memory_measure if heal_result else None,
        "calibration": calibration_protocol(config, loaded, data),
        "eval": eval_protocol(config, loaded, data),
        "prunable_weights": masks.numel(),
        "layer_sparsity": masks.layer_sparsity(),
        "preprocess": loaded.preprocess.to_dict(),
        "model_notes": {k: v for k, v in loaded.extra.items() if isinstance(v, str)},
        "command": command,
        "versions": _versions(),
    }


def calibration_protocol(config: RunConfig, loaded: LoadedModel, data: RunData) -> dict:
    out = {"source": config.calib, "size": data.calib_size, "seed": config.seed, **modality_of(loaded).calibration_protocol(config)}
    if data.generated is not None:  # heal only: pruning and the held-out text read the --calib text
        from starfish.data.generated_text import protocol

        out["generated"] = protocol(data.generated, config.seed)
    return out


def eval_protocol(config: RunConfig, loaded: LoadedModel, data: RunData) -> dict:
    """How the evaluation set was drawn: class-balanced images, or the first windows of a text."""
    return modality_of(loaded).eval_protocol(config, data)
