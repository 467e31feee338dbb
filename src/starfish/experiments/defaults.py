"""Healing defaults that depend on the kind of model: what a run uses where no flag names a value.

Why per kind: the published recipe (10 epochs, batch 32, lr 6e-4) was set on images. A language
model's calibration set is a few dozen long sequences, so batch 32 is one optimizer step per epoch,
and an epoch of a causal LM costs far more than one of a CIFAR network; the values below were
measured on SmolLM2-135M (``BENCHMARKS.md``, "How the language-model defaults were picked").
``resolve_heal_settings`` applies them, with the rules between settings, for the CLI and for
``RunConfig`` built from Python alike; the resolved values are saved in ``config.json``, so a rerun
repeats the same training. A ``HealConfig`` passed whole is taken as it is (its own defaults are
the published image recipe).
"""

from __future__ import annotations

from collections.abc import Mapping

# Causal language models. Healer: output distillation (kd), the winner of every screening row and of
# every row of the six-row matrix on SmolLM2-135M (benchmarks/LM_HEALER_SEARCH.md, LM_HEAL_MATRIX.md);
# no STARFISH-family objective matched it at an equal budget. Budget: at most 4 epochs of the default
# 240 calibration sequences (text.TEXT_CALIB_DEFAULT), i.e. 480 optimizer steps of 2 x 512 tokens
# (491,520 tokens), the held-out KL checked every epoch, stop after two checks without progress.
# Batch 2: at an equal number of tokens, smaller batches healed further on held-out text (65,536
# tokens: batch 8 23.78, batch 4 23.01, batch 2 22.52; LM_HEALER_SEARCH.md). Each step also pays a
# fixed cost, which kept the defaults at batch 4 until kd's vocabulary products moved from float32
# to the run's bf16 (heal.vocab): 48 steps of batch 2 then took 302 s instead of 357 s at the same
# held-out perplexity (22.81 vs 22.83), which lets batch 2 fit the former defaults' healing time
# (90 min on one busy CPU thread). Precision ``native``: bf16 autocast where the hardware computes it
# (a CUDA GPU, a CPU with AMX); on the team's AMX CPU it healed as well as fp32 in 0.66x the time.
# lr 3e-4 was measured on SmolLM2 (BENCHMARKS.md, "How the language-model defaults were picked").
LANGUAGE_MODEL_HEAL: dict[str, object] = {
    "healer": "kd",
    "batch_size": 2,
    "lr": 3e-4,
    "max_epochs": 4,
    "eval_every": 1,
    "patience": 2,
    "precision": "native",  # bf16 autocast where the hardware has it (CUDA, or a CPU with AMX)
}

# A run's healing budget unless one is named: stop on the held-out plateau (``heal.stopping``); the
# published recipe is ``budget="fixed"`` (10 epochs). ``heal()`` itself keeps HealConfig's "fixed".
RUN_BUDGET = "auto"

BLOCKWISE_HEALER = "starfish"  # the language-model default when --heal-scope blockwise is asked for without --healer


def heal_defaults(language_model: bool) -> dict[str, object]:
    """The heal settings a run uses where none is named: the run's budget, then the model kind's."""
    return {"budget": RUN_BUDGET, **(LANGUAGE_MODEL_HEAL if language_model else {})}


def resolve_heal_settings(language_model: bool, named: Mapping[str, object]) -> dict[str, object]:
    """The one place where heal defaults and the rules between settings are decided, for the CLI,
    ``RunConfig`` built from Python and ``prune_and_heal`` alike (through ``Modality.heal_settings``).

    Rules: a named ``epochs`` or ``max_steps`` asks for that much training, so without a named
    ``budget`` the budget is ``fixed``; a language model healed block by block without a named
    healer heals with ``BLOCKWISE_HEALER`` (kd reads logits, which a single block does not produce).
    """
    values = {**heal_defaults(language_model), **named}
    if ("epochs" in named or "max_steps" in named) and "budget" not in named:
        values["budget"] = "fixed"
    if "healer" not in named and values.get("scope") == "blockwise" and language_model:
        values["healer"] = BLOCKWISE_HEALER
    return values
