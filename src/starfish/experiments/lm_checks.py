"""The checks of a run on an ``hf:`` causal LM that its config.json decides, run by ``validate``
before the model or any text is loaded."""

from __future__ import annotations

from typing import Any

from starfish.errors import StarfishError
from starfish.data.holdout import TEXT_DEFAULT
from starfish.data.loading import GB
from starfish.models.causal_lm import context_length, is_causal_lm_config, read_hf_config
from starfish.data.text import TEXT_CALIB_DEFAULT


def language_model_settings(config: Any) -> None:
    """What a run on an ``hf:`` causal LM cannot take, decided from its config.json before the model
    or any text is loaded: a task of the other kind, sequences beyond the model's context (learned
    positions would index past their table, rotary ones run where the model never trained), and
    calibration or held-out sequences over ``--calib-max-gb`` (they are drawn with replacement, so
    memory is what bounds their count). A folder that cannot be read is named by the model loader."""
    if not str(config.model).startswith("hf:"):
        return
    try:
        hf_config = read_hf_config(config.model[len("hf:"):])
    except (StarfishError, ImportError):
        return
    if not is_causal_lm_config(hf_config):
        return
    if config.task == "classification":
        raise StarfishError("--task classification scores image classifiers; a causal LM is scored by perplexity: pass --task perplexity or auto.")
    context = context_length(hf_config)
    for flag, value in (("--seq-len", config.seq_len), ("--eval-seq-len", config.eval_seq_len)):
        if context is not None and value is not None and value > context:
            raise StarfishError(f"{flag} {value} is longer than the model's context of {context} tokens; pass {flag} {context} or less.")
    for flag, count in (("--calib-size", config.calib_size or TEXT_CALIB_DEFAULT), ("--holdout-size", config.holdout_size or TEXT_DEFAULT)):
        need = int(count) * config.seq_len * 2 * 8  # token ids and attention mask, int64
        if need > config.calib_max_gb * GB:
            raise StarfishError(
                f"{int(count)} sequences of {config.seq_len} tokens would take {need / GB:.3g} GB, over the {config.calib_max_gb:g} GB "
                f"budget; lower {flag} or raise --calib-max-gb."
            )
