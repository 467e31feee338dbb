"""Healing defaults that depend on the kind of model: what a run uses where no flag names a value.

Why per kind: the published recipe (10 epochs, batch 32, lr 6e-4) was set on images. A language
model's calibration set is a few dozen long sequences, so batch 32 is one optimizer step per epoch,
and an epoch of a causal LM costs far more than one of a CIFAR network; the values below were
measured on SmolLM2-135M (``BENCHMARKS.md``, "How the language-model defaults were picked"). The CLI applies them before validation,
and the resolved values are saved in ``config.json``, so a rerun repeats the same training.
From Python, pass them explicitly: ``HealConfig(budget="auto", **LANGUAGE_MODEL_HEAL)``.
"""

from __future__ import annotations

from collections.abc import Mapping

# Causal language models. Healer: output distillation (kd), the winner of every screening row and of
# every row of the six-row matrix on SmolLM2-135M (benchmarks/LM_HEALER_SEARCH.md, LM_HEAL_MATRIX.md);
# no STARFISH-family objective matched it at an equal budget. Budget: at most 4 epochs of the default
# 256 calibration sequences (text.TEXT_CALIB_DEFAULT), i.e. 128 optimizer steps of 8 x 512 tokens
# (524,288 tokens), the held-out KL checked every epoch, stop after two checks without progress.
# Precision ``native``: bf16 autocast where the hardware computes it (a CUDA GPU, a CPU with AMX);
# on the team's AMX CPU it healed as well as fp32 in 0.66x the time (LM_HEALER_SEARCH.md), and 128
# bf16 steps is what fits the former defaults' healing time (90 min on one busy CPU thread).
# Batch 8 and lr 3e-4 were measured on SmolLM2 (BENCHMARKS.md, "How the language-model defaults were picked").
LANGUAGE_MODEL_HEAL: dict[str, object] = {
    "healer": "kd",
    "batch_size": 8,
    "lr": 3e-4,
    "max_epochs": 4,
    "eval_every": 1,
    "patience": 2,
    "precision": "native",  # bf16 autocast where the hardware has it (CUDA, or a CPU with AMX)
}

BLOCKWISE_HEALER = "starfish"  # the language-model default when --heal-scope blockwise is asked for without --healer


def is_language_model(model: str) -> bool:
    """Whether ``--model`` names a causal LM (``hf:`` folders only; reads the config, not the weights).
    An unreadable folder is not decided here: validation names that problem with its fix."""
    if not model.startswith("hf:"):
        return False
    from starfish.errors import StarfishError
    from starfish.models.causal_lm import is_causal_lm

    try:
        return is_causal_lm(model[len("hf:") :])
    except (StarfishError, ImportError):
        return False


def apply_model_defaults(merged: dict, given: set[str]) -> dict:
    """Fill the heal settings of ``merged`` (a RunConfig dict) that no flag or config file gave
    (``given``: dotted keys such as ``heal.lr``) with the defaults of the model's kind."""
    if not is_language_model(str(merged.get("model", ""))):
        return merged
    heal: dict = dict(merged.get("heal") or {})
    for key, value in LANGUAGE_MODEL_HEAL.items():
        if f"heal.{key}" not in given:
            heal[key] = value
    if "heal.healer" not in given and heal.get("scope") == "blockwise":  # kd reads logits: block by block, heal with STARFISH
        heal["healer"] = BLOCKWISE_HEALER
    merged["heal"] = heal
    return merged


def given_keys(flags: Mapping[str, object], base: Mapping[str, object]) -> set[str]:
    """Dotted keys named by the command line (argparse dests) or by a ``--config`` file."""
    keys = {k for k in flags if not k.startswith("_")}
    for head, value in base.items():
        if isinstance(value, Mapping):
            keys |= {f"{head}.{k}" for k in value}
        else:
            keys.add(head)
    return keys
