"""Images or text: everything a job does differently for the two kinds of model, in one place.

The steps of ``run``, ``compare``, ``diagnose`` and the pipeline choice ask the job's ``Modality``
instead of testing the model's kind themselves: which checks apply before any data is read, how
calibration, held-out and evaluation data are loaded, the default evaluation task, repair and heal
settings, where alignment is probed, how the model is saved, and what the protocol records. A new
kind of model (speech, say) is one more subclass here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from starfish.errors import StarfishError
from starfish.experiments.alignment import AlignmentProbe
from starfish.experiments.defaults import resolve_heal_settings
from starfish.experiments.run_data import RunData
from starfish.masks import Masks
from starfish.models import LoadedModel
from starfish.models.causal_lm import CAUSAL_LM

RunConfig = Any  # a starfish.experiments.run_config.RunConfig: that module imports this one, so no import back


class Modality:
    """What differs between image classifiers and causal language models."""

    name: str = ""
    language: bool = False  # scored by perplexity over token windows, saved as a Hugging Face folder
    default_task: str = ""
    probe_source: str = ""  # where compare measures per-block alignment, in words
    scoring_step: int = 64  # samples per pass when scoring held-out outputs

    def heal_settings(self, named: Mapping[str, object]) -> dict[str, object]:
        """The full heal settings when ``named`` are the ones the request gives (``defaults``)."""
        return resolve_heal_settings(self.language, named)

    def check_run(self, config: RunConfig, loaded: LoadedModel) -> None:
        """What this kind of model needs of the job beyond the shared validation, before any data."""
        raise NotImplementedError

    def load_data(self, config: RunConfig, loaded: LoadedModel, calibration: bool, evaluation: bool, held_out: bool) -> RunData:
        raise NotImplementedError

    def auto_repair(self) -> tuple[str, str] | None:
        """``--repair auto``'s choice and why, where the kind decides it (None: the network decides)."""
        return None

    def candidate_defaults(self, pattern: str | None) -> dict[str, list[str] | None]:
        """``--pipeline auto``: the allocations and repairs to try where the run names none (None: all)."""
        return {"allocation": ["uniform"] if pattern else None, "repair": None}

    def save_model(self, sparse: nn.Module, loaded: LoadedModel, masks: Masks, folder: Path, generated: object = None) -> None:
        raise NotImplementedError

    def alignment_probe(self, data: RunData, seed: int) -> AlignmentProbe | None:
        """Where a run measures per-block alignment: held-out samples (never the evaluation set), else calibration."""
        raise NotImplementedError

    def calibration_protocol(self, config: RunConfig) -> dict:
        return {}

    def eval_protocol(self, config: RunConfig, data: RunData) -> dict:
        raise NotImplementedError


class Images(Modality):
    name, language, default_task = "images", False, "classification"
    probe_source = "the evaluation set (seeded random subset, labels unused)"

    def check_run(self, config: RunConfig, loaded: LoadedModel) -> None:
        from starfish.models import Preprocess
        from starfish.models.registry import check_preprocess

        if config.dtype is not None:
            raise StarfishError("--dtype applies to causal language models (hf:FOLDER); drop it for image models.")
        if config.task == "perplexity":
            raise StarfishError("--task perplexity scores causal language models; an image model is scored by classification: pass --task classification or auto.")
        if config.preprocess:
            merged = {**loaded.preprocess.to_dict(), **config.preprocess}
            merged["mean"], merged["std"] = tuple(merged["mean"]), tuple(merged["std"])
            loaded.preprocess = Preprocess(**merged)
        check_preprocess(loaded, config.preprocess)

    def load_data(self, config: RunConfig, loaded: LoadedModel, calibration: bool, evaluation: bool, held_out: bool) -> RunData:
        """Select the calibration, held-out and evaluation images; decode calibration and held-out only
        (within the calibration budget). Evaluation files are listed here and read only when scored."""
        from starfish.data.holdout import load_image_holdout
        from starfish.data.images import select_images
        from starfish.data.loading import decode_calibration

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

    def save_model(self, sparse: nn.Module, loaded: LoadedModel, masks: Masks, folder: Path, generated: object = None) -> None:
        from starfish.common.outputs import save_weights

        save_weights(sparse, folder / "model.safetensors")
        masks.save(folder / "masks.safetensors")

    def eval_protocol(self, config: RunConfig, data: RunData) -> dict:
        return {"source": config.eval, "size": data.eval_size, "seed": config.seed, "class_balanced": True}

    def alignment_probe(self, data: RunData, seed: int) -> AlignmentProbe | None:
        return AlignmentProbe.choose(data.held.samples if data.held is not None else None, data.calibration, seed)


class Text(Modality):
    name, language, default_task = "text", True, "perplexity"
    scoring_step = 1  # a language model's full-vocabulary logits: one sequence at a time
    probe_source = "the first tokens of the first held-out (else calibration) sequences"

    def check_run(self, config: RunConfig, loaded: LoadedModel) -> None:
        from starfish.models.causal_lm import tokenizer_of

        if config.calib is not None or config.eval is not None:
            tokenizer_of(loaded.extra)  # a folder without a tokenizer cannot read text
        for flag, value in (("--calib-size", config.calib_size), ("--eval-size", config.eval_size)):
            if value is not None and (value < 1 or value != int(value)):
                raise StarfishError(f"{flag} counts sequences/windows for a language model: pass a whole number >= 1 (got {value}).")
        if config.preprocess:
            raise StarfishError("--input-size/--resize/--mean/--std/--channels apply to image models; drop them for a language model.")

    def load_data(self, config: RunConfig, loaded: LoadedModel, calibration: bool, evaluation: bool, held_out: bool) -> RunData:
        """Calibration sequences (one mapping with padding masked) and the evaluation windows of a text."""
        from starfish.data.holdout import load_text_holdout
        from starfish.data.text import TEXT_CALIB_DEFAULT, draw_sequences, evaluation_windows, read_documents, text_name
        from starfish.models.causal_lm import tokenizer_of
        from starfish.nn.device import resolve_device

        tokenizer = tokenizer_of(loaded.extra) if config.calib is not None or config.eval is not None else None
        calib, held, texts, generated = None, None, {}, None
        if calibration and config.calib is not None:
            size = int(config.calib_size) if config.calib_size is not None else TEXT_CALIB_DEFAULT
            calib, picks = draw_sequences(read_documents(config.calib), tokenizer, size, config.seq_len, config.seed, f"text source {config.calib}")
            held = load_text_holdout(config, tokenizer, picks) if held_out else None
            if config.calib_generate:
                from starfish.data.generated_text import generate_calibration

                generated = generate_calibration(loaded.module, tokenizer, int(config.calib_generate), config.seq_len, config.seed,
                                                 resolve_device(config.heal.device))
        if evaluation:
            seq_len = config.eval_seq_len or int(loaded.extra["seq_len"])
            size = int(config.eval_size) if config.eval_size is not None else None
            taken: set[str] = set()
            for source in config.eval_sources:
                texts[text_name(source, taken)] = evaluation_windows(source, tokenizer, seq_len, size)
        windows = next(iter(texts.values()), None)
        return RunData(calib, windows, 1, config.workers, held=held, texts=texts, generated=generated)

    def auto_repair(self) -> tuple[str, str] | None:
        return "none", "auto: language model (variance matching is not benchmarked on language models yet)"

    def candidate_defaults(self, pattern: str | None) -> dict[str, list[str] | None]:
        return {"allocation": ["uniform"], "repair": ["none"]}

    def save_model(self, sparse: nn.Module, loaded: LoadedModel, masks: Masks, folder: Path, generated: object = None) -> None:
        """A Hugging Face folder its own library loads as it is, the masks beside it, and any
        dense-generated calibration text."""
        from starfish.models.causal_lm import save_hf_folder

        save_hf_folder(sparse, loaded.extra.get("tokenizer"), folder / "model", masks, folder / "masks.safetensors")
        if generated is not None:
            from starfish.data.generated_text import write_texts

            write_texts(generated, loaded.extra.get("tokenizer"), folder)

    def calibration_protocol(self, config: RunConfig) -> dict:
        return {"seq_len": config.seq_len}

    def alignment_probe(self, data: RunData, seed: int) -> AlignmentProbe | None:
        held = data.held.samples if data.held is not None else None
        source = held if held is not None else data.calibration
        return AlignmentProbe.from_sequences(source, "held-out" if held is not None else "calibration") if source is not None else None

    def eval_protocol(self, config: RunConfig, data: RunData) -> dict:
        windows = data.evaluation.protocol()  # type: ignore[union-attr]
        return {"source": config.eval, "size": windows["windows"], "text_sha256": windows["sha256"], **windows}


IMAGES, TEXT = Images(), Text()


def modality_of(loaded: LoadedModel) -> Modality:
    """The modality of a loaded model."""
    return TEXT if loaded.task == CAUSAL_LM else IMAGES


def modality_of_model(spec: str) -> Modality:
    """The modality of a ``--model`` spec before loading it (``hf:`` folders: reads config.json,
    never the weights; an unreadable folder counts as images here and is refused by validation)."""
    if not spec.startswith("hf:"):
        return IMAGES
    from starfish.models.causal_lm import is_causal_lm

    try:
        return TEXT if is_causal_lm(spec[len("hf:") :]) else IMAGES
    except (StarfishError, ImportError):
        return IMAGES
