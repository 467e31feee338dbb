"""Checks of user-supplied values, shared by the argparse ``type=`` helpers and the configs' validate().

Every check raises ``StarfishError`` with one line naming the setting, the bad value and what is
accepted, so a bad number, regex, device, seed or config-file entry fails before any heavy work.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from starfish.errors import StarfishError

SEED_MAX = 2**63 - 1  # numpy's default_rng and torch's manual_seed both accept 0..2**63-1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(name: str, value: Any) -> float:
    """A real number that is neither NaN nor infinite."""
    if not _is_number(value) or not math.isfinite(value):
        raise StarfishError(f"{name} must be a finite number; got {value!r}.")
    return value


def positive(name: str, value: Any) -> float:
    if finite(name, value) <= 0:
        raise StarfishError(f"{name} must be > 0; got {value!r}.")
    return value


def non_negative(name: str, value: Any) -> float:
    if finite(name, value) < 0:
        raise StarfishError(f"{name} must be >= 0; got {value!r}.")
    return value


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """A whole number (not a bool, not 1.5) within [minimum, maximum]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise StarfishError(f"{name} must be a whole number; got {value!r}.")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise StarfishError(f"{name} must be a whole number {bounds}; got {value!r}.")
    return value


def seed(name: str, value: Any) -> int:
    """A seed every generator starfish uses accepts."""
    return integer(name, value, 0, SEED_MAX)


def size(name: str, value: Any) -> float | int:
    """A count (whole number >= 1) or a fraction in (0, 1) of a folder."""
    if finite(name, value) <= 0 or (value >= 1 and value != int(value)):
        raise StarfishError(f"{name} must be a whole count >= 1 or a fraction in (0, 1); got {value!r}.")
    return int(value) if value >= 1 else value


def regex(name: str, pattern: str | None) -> str | None:
    """A pattern ``re`` can compile (None passes: the setting is off)."""
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise StarfishError(f"{name} must be a regular expression string; got {pattern!r}.")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise StarfishError(f"{name} '{pattern}' is not a valid regular expression ({exc}); fix or quote it.") from None
    return pattern


def device(name: str, value: str | None) -> str | None:
    """'auto', None, or a torch device that exists on this machine."""
    if value in (None, "auto"):
        return value
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise StarfishError(f"{name} '{value}' is not a device; use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cpu":
        return value
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise StarfishError(f"{name} '{value}' asks for CUDA but no CUDA device is available; use --device cpu or auto.")
        if dev.index is not None and dev.index >= count:
            raise StarfishError(f"{name} '{value}' does not exist: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}).")
        return value
    if dev.type == "mps" and torch.backends.mps.is_available():
        return value
    raise StarfishError(f"{name} '{value}' is not available on this machine; use auto, cpu, cuda, cuda:N or mps.")


def floats(name: str, values: Sequence[Any], nonzero: bool = False) -> list[float]:
    """Per-channel numbers (normalization mean/std): 1 or 3 finite values, nonzero when dividing by them."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) not in (1, 3):
        raise StarfishError(f"{name} must be 1 or 3 comma-separated numbers (one per RGB channel); got {values!r}.")
    for v in values:
        finite(name, v)
        if nonzero and v == 0:
            raise StarfishError(f"{name} may not contain 0 (inputs are divided by it); got {list(values)}.")
    return list(values)


def check_class_count(num_outputs: int, classes: list[str], folder: str | Path) -> None:
    """An evaluation folder must have exactly one class sub-folder per model output, or labels are wrong."""
    if classes and len(classes) != num_outputs:
        raise StarfishError(
            f"evaluation folder {folder} has {len(classes)} class folders but the model predicts {num_outputs} classes; "
            f"give it one sub-folder per class (sorted names = class order) or pick the matching --model/--num-classes."
        )


# --- config files ----------------------------------------------------------------------------

_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,)}


def _accepts(annotation: str, value: Any) -> bool:
    """Does ``value`` (parsed from JSON) fit a field annotated like 'int | None' or 'float'?"""
    parts = [p.strip() for p in annotation.split("|")]
    if value is None:
        return "None" in parts
    for part in parts:
        kinds = _TYPES.get(part)
        if kinds and isinstance(value, kinds) and (part == "bool" or not isinstance(value, bool)):
            return True
    return False


def config_types(cls: type, raw: Any, where: str = "") -> None:
    """Refuse unknown keys, nulls for required settings and values of the wrong JSON type, naming the key.

    Nested dataclass fields (the prune and heal sections) are checked recursively; a field whose
    annotation is not a plain type is left to the config's own validate().
    """
    if not isinstance(raw, dict):
        label = f"config key '{where.rstrip('.')}'" if where else "the config"
        raise StarfishError(f"{label} must be a JSON object of settings; got {json_name(raw)}.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise StarfishError(f"config has unknown keys {[where + k for k in unknown]}; known keys: {sorted(known)}.")
    for key, value in raw.items():
        annotation = known[key].type if isinstance(known[key].type, str) else getattr(known[key].type, "__name__", "")
        default = known[key].default_factory() if callable(known[key].default_factory) else None  # type: ignore[misc]
        section = known[key].metadata.get("section") or (type(default) if is_dataclass(default) else None)
        if section is not None and not is_dataclass(value):
            config_types(section, value, f"{where}{key}.")
        elif all(p.strip() in _TYPES or p.strip() == "None" for p in annotation.split("|")) and not _accepts(annotation, value):
            wanted = " or ".join("null" if p.strip() == "None" else p.strip() for p in annotation.split("|"))
            raise StarfishError(f"config key '{where}{key}' must be {wanted}; got {json_name(value)} {value!r}.")


def json_name(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def preprocess_overrides(overrides: dict | None) -> None:
    """The --input-size/--resize/--mean/--std overrides (or a config's preprocess section)."""
    if not overrides:
        return
    allowed = {"input_size", "resize", "mean", "std", "interpolation", "channels"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise StarfishError(f"config key 'preprocess' has unknown entries {unknown}; known: {sorted(allowed)}.")
    if "input_size" in overrides:
        integer("--input-size", overrides["input_size"], 1)
    if overrides.get("resize") is not None:
        integer("--resize", overrides["resize"], 1)
    if "mean" in overrides:
        floats("--mean", overrides["mean"])
    if "std" in overrides:
        floats("--std", overrides["std"], nonzero=True)
    if "channels" in overrides and overrides["channels"] not in (1, 3):
        raise StarfishError(f"--channels must be 1 or 3; got {overrides['channels']!r}.")
    if "interpolation" in overrides and overrides["interpolation"] not in ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"):
        raise StarfishError(f"preprocess interpolation must be nearest, bilinear, bicubic, box, hamming or lanczos; got {overrides['interpolation']!r}.")


# What --pipeline auto may search over (starfish.experiments.pipeline_choice).
PIPELINE_DIMENSIONS = ("pruner", "allocation", "repair")
PROBE_SIGNALS = ("auto", "kl", "objective")  # what --pipeline auto ranks candidates by


def pipeline_settings(config: Any, pruners: Sequence[str], allocations: Sequence[str], repairs: Sequence[str]) -> None:
    """``--pipeline`` and ``candidates`` settings, refused before any work (``run_config.validate``
    passes the registered pruner, allocation and repair names)."""
    if config.pipeline not in ("fixed", "auto"):
        raise StarfishError(f"--pipeline must be 'fixed' or 'auto'; got '{config.pipeline}'.")
    if config.probe_signal not in PROBE_SIGNALS:
        raise StarfishError(f"--probe-signal must be one of {', '.join(PROBE_SIGNALS)}; got '{config.probe_signal}'.")
    if config.probe_epochs < 1:
        raise StarfishError(f"--probe-epochs must be at least 1; got {config.probe_epochs}.")
    candidates = config.candidates or {}
    for dim, names in candidates.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise StarfishError(f"candidates['{dim}'] must be a list of names, e.g. [\"magnitude\", \"wanda\"]; got {names!r}.")
    unknown = sorted(set(candidates) - set(PIPELINE_DIMENSIONS))
    if unknown:
        raise StarfishError(f"candidates has unknown keys {unknown}; use {', '.join(PIPELINE_DIMENSIONS)}.")
    for dim, known in (("pruner", pruners), ("allocation", allocations), ("repair", repairs)):
        for name in candidates.get(dim) or []:
            if name not in known:
                raise StarfishError(f"unknown {dim} '{name}' among the candidates (--try-{dim}s); choose from {', '.join(known)}.")
    if config.pipeline != "auto":
        return
    if config.masks:
        raise StarfishError("--pipeline auto chooses how to prune, --masks gives the masks: drop one of them.")
    if config.heal.healer == "none":
        raise StarfishError("--pipeline auto ranks candidates by a short heal; pass a healer (e.g. --healer starfish) or use --pipeline fixed.")
    if config.heal.scope == "blockwise":
        raise StarfishError("--pipeline auto ranks candidates by the whole-network held-out objective; use --heal-scope joint or --pipeline fixed.")


def run_settings(config: Any) -> None:
    """The RunConfig's own numbers (sections validate themselves): sizes, seed, workers, batch sizes."""
    seed("--seed", config.seed)
    if config.calib_size is not None:
        size("--calib-size", config.calib_size)
    if config.eval_size is not None:
        integer("--eval-size", config.eval_size, 1)
    if config.num_classes is not None:
        integer("--num-classes", config.num_classes, 1)
    integer("--eval-batch-size", config.eval_batch_size, 1)
    integer("--workers", config.workers, 0)
    non_negative("--repair-shrinkage", config.repair_shrinkage)
    if config.holdout_size is not None:
        integer("--holdout-size", config.holdout_size, 1)
    for name in ("out", "weights", "calib", "eval", "masks", "holdout", "tasks_data"):
        values = getattr(config, name)
        for value in values if name == "eval" and isinstance(values, list) else [values]:
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise StarfishError(f"--{name.replace('_', '-')} is empty; pass a path.")
    preprocess_overrides(config.preprocess)


def heal_settings(config: Any) -> None:
    """Numbers of a HealConfig that a plain comparison lets through (NaN, inf, negative decay)."""
    integer("--epochs", config.epochs, 0)
    integer("--batch-size", config.batch_size, 1)
    positive("--lr", config.lr)
    non_negative("--min-lr", config.min_lr)
    non_negative("--weight-decay", config.weight_decay)
    positive("--temperature", config.temperature)
    if config.kd_weight is not None:
        non_negative("--kd-weight", config.kd_weight)
    if config.max_steps is not None:
        integer("--max-steps", config.max_steps, 1)
    seed("seed", config.seed)
    device("--device", config.device)
    if config.cache_device != "disk":
        device("--cache-device", config.cache_device)


def prune_settings(config: Any) -> None:
    """Numbers and patterns of a PruneConfig: finite sparsity and damping, compilable regexes."""
    finite("--sparsity", config.sparsity)
    positive("--sparsegpt-damp", config.damp)
    integer("--sparsegpt-blocksize", config.blocksize, 1)
    for flag, value in (("--include", config.include), ("--exclude", config.exclude), ("--blocks", config.blocks)):
        regex(flag, value)


def first_non_finite(tensors: Iterable[tuple[str, Any]]) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf (None if all are finite)."""
    import torch

    for name, tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None
