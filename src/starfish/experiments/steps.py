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
from functools import cached_property
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset

from starfish.nn.batch import LABELS, Batch, batch_len, call_model
from starfish.data.images import select_images
from starfish.nn.device import resolve_device
from starfish.distributed.shares import evaluation_share, lockstep_batches, statistics_share
from starfish.errors import StarfishError
from starfish.tasks.evaluate import logits_of
from starfish.heal import HealConfig, HealResult, heal
from starfish.heal.resume import Checkpointer
from starfish.data.holdout import HeldOut, load_image_holdout, load_text_holdout
from starfish.data.loading import decode_calibration, stream
from starfish.masks import Masks
from starfish.models import LoadedModel, Preprocess, create_model
from starfish.models.causal_lm import CAUSAL_LM
from starfish.models.registry import check_preprocess
from starfish.data.text import TEXT_CALIB_DEFAULT, TextWindows
from starfish.pruning import prune_with_notes
from starfish.repair import apply_repair
from starfish.experiments.run_config import RunConfig
from starfish.nn.structure import find_blocks
from starfish.tasks import Evaluation, get_task
from starfish.common.validation import check_class_count




def build_model(config: RunConfig) -> LoadedModel:
    """The dense model with the run's preprocessing overrides applied."""
    loaded = create_model(config.model, config.weights, config.pretrained, config.num_classes, dtype=config.dtype)
    if loaded.task == CAUSAL_LM:
        check_text_run(config, loaded)
        return loaded
    if config.dtype is not None:
        raise StarfishError("--dtype applies to causal language models (hf:FOLDER); drop it for image models.")
    if config.task == "perplexity":
        raise StarfishError("--task perplexity scores causal language models; an image model is scored by classification: pass --task classification or auto.")
    if config.preprocess:
        merged = {**loaded.preprocess.to_dict(), **config.preprocess}
        merged["mean"], merged["std"] = tuple(merged["mean"]), tuple(merged["std"])
        loaded.preprocess = Preprocess(**merged)
    check_preprocess(loaded, config.preprocess)
    if config.prune.blocks:  # a bad --blocks fails here, before any image is read
        find_blocks(loaded.module, config.prune.blocks)
    return loaded


@dataclass
class RunData:
    """What a job reads: the calibration set decoded once, the evaluation files streamed per pass."""

    calibration: Batch | None  # one mapping of stacked tensors (small, within --calib-max-gb)
    evaluation: Dataset | None  # decoded one batch at a time, never all at once
    eval_batch_size: int = 256
    workers: int = 0
    eval_classes: list[str] | None = None  # class folder names of the evaluation set, in label order
    held: HeldOut | None = None  # unlabeled held-out samples (starfish.data.holdout): stopping and the alignment probe
    texts: dict[str, TextWindows] = field(default_factory=dict)  # language models: every --eval text by name (the first is ``evaluation``)
    generated: Batch | None = None  # language models: --calib-generate sequences, for healing only (starfish.data.generated_text)

    @cached_property
    def heal_calibration(self) -> Batch | None:
        """What healing trains on: the calibration text, then any sequences the dense model generated."""
        from starfish.data.generated_text import joined

        return joined(self.calibration, self.generated)

    @property
    def calib_size(self) -> int:
        return batch_len(self.calibration) if self.calibration is not None else 0

    @property
    def eval_size(self) -> int:
        return len(self.evaluation) if self.evaluation is not None else 0  # type: ignore[arg-type]

    def eval_batches(self, device: torch.device | None = None) -> Iterable[Batch]:
        """A fresh pass over the evaluation set as dict batches (DataLoader, pinned on accelerators)."""
        if self.evaluation is None:
            return iter(())
        share = evaluation_share(self.evaluation)  # every W-th sample under --distributed; tasks sum the tallies
        if isinstance(share, TextWindows):  # one window at a time: full-vocabulary logits are large
            return lockstep_batches(share.batches(1), self.eval_size, 1)
        return lockstep_batches(stream(share, self.eval_batch_size, self.workers, device), self.eval_size, self.eval_batch_size)

    def calibration_labelled(self) -> bool:
        labels = self.calibration.get(LABELS) if self.calibration is not None else None
        return labels is not None and not bool((labels < 0).any())

    def evaluation_labelled(self) -> bool:
        labels = getattr(self.evaluation, "labels", None)
        return labels is not None


def check_text_run(config: RunConfig, loaded: LoadedModel) -> None:
    """What a language-model run needs beyond the shared validation, before any text is read."""
    from starfish.models.causal_lm import tokenizer_of

    if config.calib is not None or config.eval is not None:
        tokenizer_of(loaded.extra)  # a folder without a tokenizer cannot read text
    for flag, value in (("--calib-size", config.calib_size), ("--eval-size", config.eval_size)):
        if value is not None and (value < 1 or value != int(value)):
            raise StarfishError(f"{flag} counts sequences/windows for a language model: pass a whole number >= 1 (got {value}).")
    if config.preprocess:
        raise StarfishError("--input-size/--resize/--mean/--std/--channels apply to image models; drop them for a language model.")


def task_name(config: RunConfig, loaded: LoadedModel) -> str:
    """The evaluation task: the one asked for, or (auto) perplexity for causal LMs, top-1 otherwise."""
    if config.task != "auto":
        return config.task
    return "perplexity" if loaded.task == CAUSAL_LM else "classification"


def load_text_data(config: RunConfig, loaded: LoadedModel, calibration: bool, evaluation: bool, held_out: bool = True) -> RunData:
    """Calibration sequences (one mapping with padding masked) and the evaluation windows of a text."""
    from starfish.models.causal_lm import tokenizer_of
    from starfish.data.text import calibration_text, evaluation_windows, text_name

    calib, held, texts, generated = None, None, {}, None
    if calibration and config.calib is not None:
        size = int(config.calib_size) if config.calib_size is not None else TEXT_CALIB_DEFAULT
        calib = calibration_text(config.calib, tokenizer_of(loaded.extra), size, config.seq_len, config.seed)
        held = load_text_holdout(config, tokenizer_of(loaded.extra)) if held_out else None
        if config.calib_generate:
            from starfish.data.generated_text import generate_calibration

            generated = generate_calibration(loaded.module, tokenizer_of(loaded.extra), int(config.calib_generate), config.seq_len, config.seed,
                                             resolve_device(config.heal.device))
    if evaluation:
        seq_len = config.eval_seq_len or int(loaded.extra["seq_len"])
        size = int(config.eval_size) if config.eval_size is not None else None
        taken: set[str] = set()
        for source in config.eval_sources:
            texts[text_name(source, taken)] = evaluation_windows(source, tokenizer_of(loaded.extra), seq_len, size)
    windows = next(iter(texts.values()), None)
    return RunData(calib, windows, 1, config.workers, held=held, texts=texts, generated=generated)


def load_data(
    config: RunConfig, loaded: LoadedModel, calibration: bool = True, evaluation: bool = True, held_out: bool = True
) -> RunData:
    """Select the calibration, held-out and evaluation samples; decode calibration and held-out only
    (within the calibration budget). Evaluation files are listed here and read only when scored."""
    if loaded.task == CAUSAL_LM:
        return load_text_data(config, loaded, calibration, evaluation, held_out)
    transform = loaded.preprocess.transform()
    evalset, classes, eval_paths = None, None, set()
    if evaluation and config.eval is not None:  # listed and chosen only: no evaluation file is opened here
        evalset, index, _ = select_images(config.eval, transform, config.eval_size, config.seed, "eval", balanced=True)
        classes, eval_paths = index.classes, {p.resolve() for p in index.paths}
    calib, held = None, None
    if calibration and config.calib is not None:
        files, calib_index, picks = select_images(config.calib, transform, config.calib_size, config.seed, "calibration", balanced=False)
        calib = decode_calibration(files, config.calib_max_gb, workers=config.workers, progress=config.heal.progress)
        held = load_image_holdout(config, transform, calib_index, picks, eval_paths) if held_out else None
    return RunData(calib, evalset, config.eval_batch_size, config.workers, classes, held)


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
    if loaded.task != CAUSAL_LM or (len(data.texts) < 2 and not config.eval_tasks):
        return None
    from starfish.models.causal_lm import tokenizer_of

    zeroshot = None
    if config.eval_tasks:
        from starfish.zeroshot import ZeroShot

        zeroshot = ZeroShot.check(config.eval_tasks, config.tasks_data, config.eval_limit, config.seed)
    return LanguageScores(data.texts, zeroshot, tokenizer_of(loaded.extra), resolve_device(config.heal.device))
