"""The steps every job is made of: build -> load data -> prune -> repair -> heal -> evaluate.

``starfish run`` (``experiments.run``), ``starfish compare`` (``compare.compare``), ``starfish
diagnose`` and the benchmark scripts call these functions and nothing else to do that work, so
the sequence is written once. Calibration data travels as ONE mapping (``starfish.nn.batch``);
``stage_calibration`` is the single place that hands it to pruning, repairs and healing.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from starfish.nn.batch import LABELS, Batch, call_model
from starfish.nn.device import resolve_device
from starfish.distributed.shares import statistics_share
from starfish.errors import StarfishError
from starfish.tasks.evaluate import logits_of
from starfish.heal import HealConfig, HealResult, heal
from starfish.heal.resume import Checkpointer
from starfish.data.holdout import HeldOut
from starfish.masks import Masks
from starfish.models import LoadedModel, Preprocess, create_model
from starfish.data.text import TextWindows
from starfish.pruning import prune_with_notes
from starfish.repair import apply_repair
from starfish.experiments.run_config import RunConfig
from starfish.experiments.modality import modality_of
from starfish.experiments.run_data import RunData
from starfish.nn.structure import find_blocks
from starfish.tasks import Evaluation, get_task
from starfish.common.validation import check_class_count




def build_model(config: RunConfig) -> LoadedModel:
    """The dense model, checked against what its modality needs of the job (preprocessing
    overrides applied to an image model)."""
    loaded = create_model(config.model, config.weights, config.pretrained, config.num_classes, dtype=config.dtype)
    modality_of(loaded).check_run(config, loaded)
    if config.prune.blocks:  # a bad --blocks fails here, before any image is read
        find_blocks(loaded.module, config.prune.blocks)
    return loaded


def task_name(config: RunConfig, loaded: LoadedModel) -> str:
    """The evaluation task: the one asked for, or (auto) the modality's (perplexity for causal LMs, top-1 otherwise)."""
    if config.task != "auto":
        return config.task
    return modality_of(loaded).default_task


def load_data(
    config: RunConfig, loaded: LoadedModel, calibration: bool = True, evaluation: bool = True, held_out: bool = True
) -> RunData:
    """Select the calibration, held-out and evaluation samples the way the model's modality reads
    them; calibration and held-out are decoded (within the calibration budget), evaluation files
    only listed, read when scored."""
    return modality_of(loaded).load_data(config, loaded, calibration, evaluation, held_out)


def stage_calibration(calibration: Batch | None, labels: bool = False, whole: bool = False) -> Batch | None:
    """THE one place calibration data is handed to prune / apply_repair / heal / measure_rr: the
    calibration mapping, with its labels only for a healer that is allowed to use them.

    Under ``--distributed`` a statistics pass gets this rank's disjoint slice (its sums are
    all-reduced by the consumer); healing (``whole``) gets every sample and takes its share of
    every global batch (``starfish.distributed``)."""
    if calibration is None:
        return None
    staged = calibration if labels else {k: v for k, v in calibration.items() if k != LABELS}
    return staged if whole else statistics_share(staged)


def evaluation(config: RunConfig, data: RunData, loaded: LoadedModel) -> Evaluation | None:
    """The run's task on its evaluation set, with the dense model as the reference every model is compared to."""
    dense = loaded.module
    if data.evaluation is None:
        return None
    device = resolve_device(config.heal.device)
    if data.eval_classes:  # before any long pass: wrong class folders would mean wrong labels
        check_class_count(output_width(dense, loaded.preprocess, device), data.eval_classes, config.eval)
    return Evaluation(get_task(task_name(config, loaded)), lambda: data.eval_batches(device), dense, device)


@torch.no_grad()
def output_width(model: nn.Module, preprocess: Preprocess, device: torch.device) -> int:
    """The number of classes the model scores, from one forward pass on a blank input of the model's
    size (no evaluation sample is read before the final scoring)."""
    size = preprocess.input_size
    batch = {"pixel_values": torch.zeros(1, preprocess.channels, size, size, device=device)}
    was_training = model.training
    model.to(device).eval()
    try:
        return int(logits_of(call_model(model, batch)).shape[-1])
    finally:
        model.train(was_training)


def prune_step(
    config: RunConfig, dense: nn.Module, calibration: Batch | None
) -> tuple[nn.Module, Masks, dict, float]:
    """A pruned copy of ``dense`` (from saved masks or the pruner), its masks, notes and seconds."""
    sparse = copy.deepcopy(dense)
    started = time.perf_counter()
    notes: dict = {}
    if config.masks:
        masks = Masks.load(config.masks)
        masks.apply_(sparse)
    else:
        masks, notes = prune_with_notes(sparse, config.prune, seed=config.seed, calibration=stage_calibration(calibration))
    seconds = time.perf_counter() - started
    if config.heal_from == "dense-masked":  # drop a reconstructing pruner's weight updates
        sparse.load_state_dict(dense.state_dict())
        masks.apply_(sparse)
    return sparse, masks, notes, seconds


def repair_step(name: str, dense: nn.Module, sparse: nn.Module, masks: Masks, calibration: Batch | None, **options) -> dict:
    """A label-free repair of ``sparse`` in place (``none`` does nothing)."""
    if name == "none":
        return {"repair": "none"}
    return apply_repair(name, dense, sparse, masks, stage_calibration(calibration), **options)


def heal_step(
    dense: nn.Module,
    sparse: nn.Module,
    masks: Masks,
    calibration: Batch | None,
    heal_config: HealConfig,
    block_pattern: str | None,
    seed: int,
    checkpointer: Checkpointer | None = None,
    held: HeldOut | None = None,
    observer: Callable[[int], None] | None = None,
) -> HealResult:
    """Heal ``sparse`` in place. Only a healer that uses labels is handed the labels; the held-out
    samples (budget auto) are inputs only. ``checkpointer``: save the healing state as it goes,
    continue a saved one (``heal.resume``); ``observer(steps)`` runs after every step (joint scope)."""
    from starfish.heal.objectives import OBJECTIVES

    if calibration is None:
        raise StarfishError("healing needs calibration images: pass --calib DIR (or --healer none).")
    config = copy.deepcopy(heal_config)
    config.seed = seed
    uses_labels = config.healer in OBJECTIVES and OBJECTIVES[config.healer].uses_labels
    holdout = (held.samples, held.source) if held is not None else (None, "held-out samples")
    return heal(
        dense, sparse, masks, stage_calibration(calibration, labels=uses_labels, whole=True), config,
        block_pattern=block_pattern, checkpointer=checkpointer, holdout=holdout[0], holdout_source=holdout[1],
        observer=observer,
    )


def choose_cache_dtype_step(config: HealConfig, healers: list[str], dense: nn.Module, calibration: Batch | None, block_pattern: str | None) -> HealConfig:
    """Before pruning: the heal config with its target-cache dtype decided from the dense model's
    activation range on the calibration set (``heal.cache_dtype``), when any of ``healers`` caches
    dense targets; an explicit float16 the model overflows is refused here, before heavy work."""
    from dataclasses import replace

    from starfish.heal.cache_dtype import resolve_cache_dtype
    from starfish.heal.objectives import OBJECTIVES

    caches = [h for h in healers if h in OBJECTIVES and OBJECTIVES[h].needs_dense]
    if calibration is None or not caches or config.cache_dtype not in ("auto", "float16"):
        return config
    staged = stage_calibration(calibration, whole=True)
    choice = resolve_cache_dtype(config.cache_dtype, dense, staged, config.batch_size, block_pattern)
    return replace(config, cache_dtype=choice.dtype, cache_dtype_reason=choice.reason)


def check_masks(masks: Masks, model: nn.Module, where: str) -> None:
    """Masked weights must be exactly zero; a violation is a bug, not a user error."""
    broken = masks.violations(model)
    if broken:
        raise RuntimeError(f"mask contract violated {where}: {broken}")


@dataclass
class LanguageScores:
    """What a language-model job scores beside its main perplexity text: every further --eval text
    (perplexity) and the zero-shot tasks (``starfish.zeroshot``), for each model it is handed."""

    texts: dict[str, TextWindows]
    zeroshot: object | None  # starfish.zeroshot.ZeroShot
    tokenizer: object
    device: torch.device
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)  # text -> label -> perplexity

    def score(self, label: str, model: nn.Module) -> dict:
        """Perplexity on every further text and the zero-shot tasks of ``model`` under ``label``."""
        from starfish.tasks.lm_eval import evaluate_lm

        out: dict = {}
        for name, windows in list(self.texts.items())[1:]:
            value = evaluate_lm({label: model}, windows.batches(1), self.device, reference=None)[label]["perplexity"]
            self.perplexity.setdefault(name, {})[label] = value
            out.setdefault("perplexity_texts", {})[name] = value
        if self.zeroshot is not None:
            from starfish.zeroshot import means

            tasks = self.zeroshot.score(label, model, self.tokenizer)
            out["zeroshot"] = {"tasks": tasks, **means(tasks)}
        return out

    def record(self, main: dict[str, float] | None = None) -> dict:
        """The report section: perplexity per text (``main``: the first text's, from the run's task)."""
        out: dict = {}
        if len(self.texts) > 1:
            names = list(self.texts)
            per_text = {names[0]: dict(main or {}), **self.perplexity}
            out["perplexity_by_text"] = {n: {"perplexity": per_text.get(n, {}), **self.texts[n].protocol()} for n in names}
        if self.zeroshot is not None:
            out["zeroshot"] = self.zeroshot.record()
        return out

    def close(self) -> None:
        if self.zeroshot is not None:
            self.zeroshot.close()


def language_scores(config: RunConfig, loaded: LoadedModel, data: RunData) -> LanguageScores | None:
    """The further texts and zero-shot tasks of a language-model job, or None when it has neither."""
    if not modality_of(loaded).language or (len(data.texts) < 2 and not config.eval_tasks):
        return None
    from starfish.models.causal_lm import tokenizer_of

    zeroshot = None
    if config.eval_tasks:
        from starfish.zeroshot import ZeroShot

        zeroshot = ZeroShot.check(config.eval_tasks, config.tasks_data, config.eval_limit, config.seed)
    return LanguageScores(data.texts, zeroshot, tokenizer_of(loaded.extra), resolve_device(config.heal.device))
