"""``prune_and_heal``: the whole job on a Hugging Face causal LM already in memory, the way
transformers users hold one (``AutoModelForCausalLM`` + tokenizer + texts).

Why a separate entry: ``starfish run`` starts from a folder and writes a run folder; a user who
has the model in a notebook wants it back pruned and healed, ready for ``save_pretrained``. The
settings are the command line's: the pruning flags' defaults, the language-model calibration size
and the heal settings ``Modality.heal_settings`` gives a language model, so the same
request heals the same way from either entry.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from torch import nn

from starfish.errors import StarfishError

DEFAULT_PRUNER = "wanda"  # the activation-aware one-shot pruner the LLM pruning literature compares against


def prune_and_heal(
    model: nn.Module,
    tokenizer,
    texts: str | Sequence[str],
    sparsity: float = 0.5,
    *,
    pattern: str | None = None,
    pruner: str = DEFAULT_PRUNER,
    calib_size: int | None = None,
    seq_len: int = 512,
    heal: Mapping[str, object] | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> nn.Module:
    """Prune ``model`` in place to ``sparsity`` (or an N:M ``pattern`` such as ``"2:4"``) and heal it
    without labels on ``texts`` (one string or a list of documents), then return it.

    ``calib_size`` sequences of ``seq_len`` tokens are drawn from the texts with ``seed`` (default
    ``text.TEXT_CALIB_DEFAULT``), and 16 more with another seed, apart from those, for the held-out stopping check.
    ``heal`` names heal settings (``HealConfig`` fields, e.g. ``{"healer": "starfish"}``); the rest
    are the language-model defaults. The dense teacher is a copy made here (the model's size again
    in memory, freed on return). The returned model keeps every pruned weight exactly zero; its
    masks are at ``model.starfish_masks`` and the heal summary at ``model.starfish_heal``, and
    ``model.save_pretrained(folder)`` writes a folder transformers loads as it is.
    """
    from starfish.experiments.modality import TEXT
    from starfish.heal import HealConfig
    from starfish.data.holdout import SEED_OFFSET, TEXT_DEFAULT
    from starfish.models.causal_lm import decoder_block_pattern, refuse_fused_experts
    from starfish.data.holdout import HeldOut
    from starfish.pruning import PruneConfig, prune_with_notes
    from starfish.pruning.pruners import get_pruner
    from starfish.experiments.steps import check_masks, choose_cache_dtype_step, heal_step, stage_calibration
    from starfish.data.text import TEXT_CALIB_DEFAULT, draw_sequences
    from starfish.common.validation import config_types

    documents = [texts] if isinstance(texts, str) else list(texts)
    if not documents or not all(isinstance(d, str) for d in documents):
        raise StarfishError("texts must be a string or a non-empty list of strings (the unlabeled calibration text).")
    _refuse_conv1d(model)
    blocks = decoder_block_pattern(model)
    refuse_fused_experts(model, blocks)
    named = dict(heal or {})
    config_types(HealConfig, named, "heal.")  # an unknown setting or a wrong type names its key
    heal_config = HealConfig(**{**TEXT.heal_settings(named), "device": device, "progress": progress, "seed": seed}).validate()
    prune_config = PruneConfig(sparsity=sparsity, pruner=pruner, pattern=pattern).validate()
    get_pruner(prune_config.pruner)  # an unknown pruner is refused before any work, naming the choices
    size = int(calib_size) if calib_size is not None else TEXT_CALIB_DEFAULT

    calibration, picks = draw_sequences(documents, tokenizer, size, seq_len, seed)

    held = HeldOut(draw_sequences(documents, tokenizer, TEXT_DEFAULT, seq_len, seed + SEED_OFFSET, "the texts", avoid=picks)[0],
                   f"{TEXT_DEFAULT} sequences of {seq_len} tokens from the texts (seed {seed + SEED_OFFSET}, apart from the calibration sequences)")
    was_training = model.training
    model.eval()
    dense = copy.deepcopy(model)  # the teacher: healing aligns the pruned model with it
    for p in dense.parameters():
        p.requires_grad_(False)
    heal_config = choose_cache_dtype_step(heal_config, [heal_config.healer], dense, calibration, blocks)
    masks, _ = prune_with_notes(model, prune_config, seed=seed, calibration=stage_calibration(calibration))
    summary: dict = {"healer": "none"}
    if heal_config.healer != "none":
        result = heal_step(dense, model, masks, calibration, heal_config, blocks, seed, held=held)
        summary = result.to_dict()
    del dense
    check_masks(masks, model, "after prune_and_heal")
    model.train(was_training)
    model.starfish_masks = masks
    model.starfish_heal = summary
    return model


def _refuse_conv1d(model: nn.Module) -> None:
    """GPT-2-style ``Conv1D`` layers store weights transposed; the folder loader converts them and
    back on save, an in-memory model would come back converted."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return
    if any(isinstance(m, Conv1D) for m in model.modules()):
        raise StarfishError(
            f"{type(model).__name__} uses transformers Conv1D layers, which prune_and_heal does not convert in memory; "
            "save it with save_pretrained and run `starfish run --model hf:FOLDER` (or starfish.run) instead."
        )

