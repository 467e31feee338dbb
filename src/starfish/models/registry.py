"""A string registry of models (``create_model`` / ``list_models``), in the style of timm.

A spec is one of
  * a built-in name, e.g. ``cifar10-vit`` (see ``list_models()``);
  * ``timm:<name>`` — any timm architecture (pretrained weights through timm when asked);
  * ``torchvision:<name>`` — any torchvision classification architecture;
  * ``hf:<name or folder>`` — a Hugging Face causal language model (``AutoModelForCausalLM``, with
    its tokenizer in ``LoadedModel.extra["tokenizer"]``) or an ``AutoModelForImageClassification``;
  * ``package.module:factory`` — any callable returning an ``nn.Module``.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_GRAY_MEAN = (0.449,)  # the ImageNet statistics averaged over R, G, B
IMAGENET_GRAY_STD = (0.226,)


@dataclass
class Preprocess:
    """How raw images become model inputs; travels with the model so data can't mismatch it."""

    input_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int | None = None  # shorter side before the center crop; None = resize to input_size
    interpolation: str = "bilinear"
    channels: int = 3  # 3 = RGB, 1 = grayscale ("L")
    assumed: str | None = None  # what was guessed because the model carries no preprocessing of its own

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if self.channels not in (1, 3):
            raise StarfishError(f"--channels must be 1 (grayscale) or 3 (RGB); got {self.channels}.")
        if len(self.mean) not in (1, self.channels) or len(self.std) not in (1, self.channels):  # 1 value broadcasts
            raise StarfishError(
                f"preprocessing has {self.channels} channel(s) but mean has {len(self.mean)} and std {len(self.std)} "
                f"values; pass --mean and --std with {self.channels} value(s) each."
            )

    @property
    def image_mode(self) -> str:
        """The PIL mode images are decoded to."""
        return "L" if self.channels == 1 else "RGB"

    def transform(self) -> Callable:
        from torchvision import transforms as T

        mode = getattr(T.InterpolationMode, self.interpolation.upper())
        steps = []
        if self.resize is not None:
            steps += [T.Resize(self.resize, interpolation=mode), T.CenterCrop(self.input_size)]
        else:
            steps += [T.Resize((self.input_size, self.input_size), interpolation=mode)]
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        pipeline = T.Compose(steps)
        pipeline.image_mode = self.image_mode  # read by data.ImageFiles when decoding
        return pipeline

    def to_dict(self) -> dict:
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "channels": self.channels,
            "assumed": self.assumed,
        }


@dataclass
class LoadedModel:
    """A model plus what a pipeline needs to know about it."""

    module: nn.Module
    spec: str
    preprocess: Preprocess
    weights: str | None = None
    weights_sha256: str | None = None
    block_pattern: str | None = None  # regex over module names; None = automatic discovery
    extra: dict = field(default_factory=dict)  # causal LMs: "tokenizer" (None if absent), "seq_len" (eval window)
    task: str = "classification"  # or "causal-lm"


Builder = Callable[..., tuple[nn.Module, Preprocess]]
MODELS: Registry[tuple[Builder, str]] = Registry("model", "--model")  # built-in names; timm:/torchvision:/hf:/module:factory specs resolve in create_model


def register_model(name: str, description: str = "") -> Callable[[Builder], Builder]:
    """Decorator: make ``name`` resolvable by ``create_model``."""

    def wrap(fn: Builder) -> Builder:
        MODELS.add(name, (fn, description or (fn.__doc__ or "").strip().splitlines()[0]))
        return fn

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Built-in model names matching a shell-style pattern (timm/torchvision specs are open-ended)."""
    return MODELS.names(pattern)


def describe_models() -> dict[str, str]:
    return {n: MODELS[n][1] for n in list_models()}


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


WRAPPER_PREFIXES = {"module.": "DataParallel/DDP", "model.": "PyTorch Lightning"}


class StateDict(dict):
    """A state dict that remembers which wrapper prefix was stripped from its keys (if any)."""

    stripped_prefix: str | None = None


def strip_wrapper_prefix(state: dict[str, torch.Tensor], own_keys: Iterable[str] | None = None) -> StateDict:
    """Drop a ``module.`` (DataParallel) / ``model.`` (Lightning) prefix shared by every key, when
    that makes more keys fit the model (a model whose own keys start with ``model.`` keeps them).
    Without the model's keys only ``module.`` is stripped, as before."""
    own = set(own_keys) if own_keys is not None else None
    allowed = tuple(WRAPPER_PREFIXES) if own is not None else ("module.",)
    candidates = [("", state)]  # every way of peeling wrapper prefixes off, outermost first
    while candidates[-1][1]:
        stripped, current = candidates[-1]
        prefix = next((p for p in allowed if all(k.startswith(p) for k in current)), None)
        if prefix is None:
            break
        candidates.append((stripped + prefix, {k[len(prefix):]: v for k, v in current.items()}))
    if own is None:
        stripped, state = candidates[-1]
    else:  # the peeling that fits the most of the model's keys; the original wins ties
        stripped, state = max(candidates, key=lambda c: (len(own & set(c[1])), -len(c[0])))
    out = StateDict(state)
    out.stripped_prefix = stripped or None
    return out


def _read_state_dict(path: Path, own_keys: Iterable[str] | None = None) -> StateDict:
    """A checkpoint's tensors: a bare state dict, or the ``state_dict``/``model`` entry of a training
    checkpoint (Lightning ``.ckpt`` included), with any wrapper prefix stripped (``.stripped_prefix``
    says which; create_model records it in ``LoadedModel.extra`` and the report shows it)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return strip_wrapper_prefix(load_file(str(path)), own_keys)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-torch files
        hint = (
            "a Lightning checkpoint holding Python objects cannot be read safely; save its weights with "
            "torch.save(torch.load(p, weights_only=False)['state_dict'], 'weights.pth')"
            if path.suffix == ".ckpt"
            else "Pass a PyTorch state dict (.pth/.pt/.th/.ckpt) or a .safetensors file"
        )
        raise StarfishError(f"could not read weights file {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}; {hint}.") from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StarfishError(
            f"weights file {path} does not hold a state dict of tensors; "
            "save it with torch.save(model.state_dict(), path)."
        )
    return strip_wrapper_prefix(obj, own_keys)


def load_weights(model: nn.Module, path: str | Path, spec: str = "the model") -> str | None:
    """Strictly load a state dict; a mismatch is a clear error listing what does not fit.
    Returns the wrapper prefix stripped from the keys ('module.', 'model.'), if any."""
    path = Path(path)
    if not path.is_file():
        raise StarfishError(f"weights file {path} does not exist; check the --weights path.")
    own = model.state_dict()
    try:
        state = _read_state_dict(path, own.keys())
    except StarfishError:
        raise
    except Exception as exc:  # a corrupt or truncated .safetensors file (SafetensorError), unreadable file
        raise StarfishError(
            f"could not read weights file {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "pass an intact PyTorch state dict (.pth/.pt/.th) or .safetensors file."
        ) from None
    from starfish.common.validation import first_non_finite

    bad = first_non_finite(state.items())
    if bad is not None:
        raise StarfishError(f"weights file {path} holds NaN or infinite values (first in '{bad}'); pass intact weights.")
    for key in set(own) - set(state):
        if key.endswith("num_batches_tracked"):  # absent from checkpoints of old PyTorch; harmless
            state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise StarfishError(
            f"weights file {path} does not fit {spec} ({'; '.join(parts)}); "
            "pass the weights that were trained for this architecture or pick the matching --model."
        )
    model.load_state_dict(state, strict=True)
    return state.stripped_prefix


def _timm_model(name: str, pretrained: bool, num_classes: int | None) -> tuple[nn.Module, Preprocess]:
    import timm

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        raise StarfishError(f"timm cannot build '{name}': {exc}. See timm.list_models() for names.") from None
    except Exception as exc:  # network failures when pretrained weights are requested offline
        raise StarfishError(
            f"timm could not create '{name}' (pretrained={pretrained}): {type(exc).__name__}: {exc}. "
            "Offline? Pass --weights PATH instead of downloading."
        ) from None
    cfg = timm.data.resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct", 1.0) or 1.0)
    resize = int(round(size / crop_pct)) if crop_pct < 1.0 else None
    pre = Preprocess(size, tuple(cfg["mean"]), tuple(cfg["std"]), resize, str(cfg.get("interpolation", "bilinear")))
    return model, pre


def _torchvision_model(name: str, pretrained: bool, num_classes: int | None) -> tuple[nn.Module, Preprocess]:
    import torchvision

    try:
        weights = "DEFAULT" if pretrained else None
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
    except ValueError as exc:
        raise StarfishError(
            f"torchvision has no model '{name}' ({exc}); see torchvision.models.list_models()."
        ) from None
    except Exception as exc:
        raise StarfishError(
            f"torchvision could not create '{name}': {type(exc).__name__}: {exc}. "
            "Offline? Pass --weights PATH instead of downloading."
        ) from None
    size = 299 if name.startswith("inception") else 224
    return model, Preprocess(size, IMAGENET_MEAN, IMAGENET_STD, resize=int(size * 256 / 224))


def _hf_model(name: str, pretrained: bool, num_classes: int | None) -> tuple[nn.Module, Preprocess]:
    """A Hugging Face image classifier from a local folder or the hub cache (never downloads offline)."""
    from starfish.models.causal_lm import check_finite_weights, check_loading_info, unreadable_weights

    try:
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
    except ImportError:
        raise StarfishError("hf:<name> needs the transformers package: pip install 'starfish-heal[hf]'.") from None
    kwargs = {} if num_classes is None else {"num_labels": num_classes, "ignore_mismatched_sizes": True}
    info = None
    try:
        if pretrained or Path(name).is_dir():
            model, info = AutoModelForImageClassification.from_pretrained(name, output_loading_info=True, **kwargs)
        else:
            config = AutoConfig.from_pretrained(name, **({"num_labels": num_classes} if num_classes else {}))
            model = AutoModelForImageClassification.from_config(config)
    except OSError as exc:
        raise StarfishError(
            f"Hugging Face model '{name}' is not available ({str(exc).splitlines()[0]}); "
            "pass a local folder made with save_pretrained, or download it first."
        ) from None
    except Exception as exc:  # corrupt weight files
        raise StarfishError(unreadable_weights(name, exc)) from None
    if info is not None and num_classes is None:  # a new --num-classes head starts fresh; all else loads strictly
        check_loading_info(name, info)
    check_finite_weights(model, name)
    pre = Preprocess()
    try:
        proc = AutoImageProcessor.from_pretrained(name)
        size = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
        side = int(size.get("height") or size.get("shortest_edge") or 224)
        pre = Preprocess(side, tuple(proc.image_mean), tuple(proc.image_std))
    except (OSError, AttributeError, TypeError, ValueError):
        pass  # no processor saved: ImageNet defaults; override with --input-size/--mean/--std
    return model, pre


def _factory_model(spec: str, num_classes: int | None) -> tuple[nn.Module, Preprocess]:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise StarfishError(
            f"cannot import '{attr}' from '{module_name}' ({exc}); "
            "a user model spec is 'package.module:factory' with the package importable."
        ) from None
    model = factory() if num_classes is None else factory(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise StarfishError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module.")
    pre = getattr(model, "starfish_preprocess", None) or _assumed_preprocess(model)
    return model, pre


def _hf_causal_lm(spec: str, weights: str | Path | None, dtype: str | None) -> LoadedModel:
    from starfish.models.causal_lm import CAUSAL_LM, default_seq_len, load_causal_lm

    if weights is not None:
        raise StarfishError(f"{spec} is a causal LM: its weights come from the folder; drop --weights.")
    model, tokenizer, pattern = load_causal_lm(spec[len("hf:"):], dtype)
    extra = {"tokenizer": tokenizer, "seq_len": default_seq_len(model)}
    return LoadedModel(model, spec, Preprocess(), None, None, pattern, extra, CAUSAL_LM)


def _assumed_preprocess(model: nn.Module) -> Preprocess:
    """ImageNet-style defaults for a model that says nothing about its inputs (flagged as assumed);
    grayscale when its first convolution takes one channel."""
    from starfish.nn.structure import input_channels

    if input_channels(model) == 1:
        return Preprocess(224, IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD, channels=1, assumed="224 px, 1 channel, mean 0.449, std 0.226")
    return Preprocess(assumed="224 px, RGB, ImageNet mean/std")


@torch.no_grad()
def _dry_run(loaded: LoadedModel, expected_channels: int) -> None:
    """Run one blank image of the configured shape; a shape error becomes a one-line fix."""
    from starfish.nn.batch import call_model, model_device

    pre = loaded.preprocess
    blank = torch.zeros(1, pre.channels, pre.input_size, pre.input_size, device=model_device(loaded.module))
    was_training = loaded.module.training
    loaded.module.eval()
    try:
        call_model(loaded.module, {"pixel_values": blank})
    except (RuntimeError, ValueError, AssertionError) as exc:
        fix = (
            f"pass --channels {expected_channels} (with --mean/--std of {expected_channels} value(s))"
            if expected_channels != pre.channels
            else "pass the --input-size it was trained at"
        )
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise StarfishError(
            f"{loaded.spec} cannot take {pre.channels}-channel {pre.input_size}px images ({first}); {fix}."
        ) from None
    finally:
        loaded.module.train(was_training)


def check_preprocess(loaded: LoadedModel, overrides: dict | None = None) -> None:
    """Before any data is read: refuse a channel count the model cannot take, and warn loudly (and
    record in ``loaded.extra``) when preprocessing is a guess the user did not override."""
    from starfish.nn.structure import input_channels

    pre = loaded.preprocess
    expected = input_channels(loaded.module)
    given = set(overrides or {})
    if expected is not None:  # an image model: one blank image must go through it
        _dry_run(loaded, expected)
    if pre.assumed and {"input_size", "mean", "std"} <= given:
        pre.assumed = None  # the user gave every guessed value
    if pre.assumed:
        note = f"{loaded.spec} defines no starfish_preprocess; assuming {pre.assumed}" + (
            f" (overridden: {', '.join(sorted(given))})" if given else ""
        )
        loaded.extra["preprocess_assumed"] = note
        sys.stderr.write(
            f"starfish: warning: {note}. If that is wrong, accuracy is meaningless: pass --input-size/--mean/--std "
            "(and --channels) or set model.starfish_preprocess = starfish.Preprocess(...).\n"
        )


def create_model(
    spec: str,
    weights: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    dtype: str | None = None,
) -> LoadedModel:
    """Build a model from a spec string, optionally loading weights strictly. Returns eval mode.

    ``dtype`` (float32 | bfloat16 | float16) is the precision a causal LM is loaded in."""
    if spec.startswith("hf:"):
        from starfish.models.causal_lm import read_hf_config, is_causal_lm_config, refuse_unsupported_hf

        hf_config = read_hf_config(spec[len("hf:"):])
        if is_causal_lm_config(hf_config):
            return _hf_causal_lm(spec, weights, dtype)
        refuse_unsupported_hf(spec, hf_config)
    if spec in MODELS:
        builder = MODELS[spec][0]
        model, pre = builder() if num_classes is None else builder(num_classes=num_classes)
    elif spec.startswith("timm:"):
        model, pre = _timm_model(spec[len("timm:"):], pretrained and weights is None, num_classes)
    elif spec.startswith("torchvision:"):
        model, pre = _torchvision_model(spec[len("torchvision:"):], pretrained and weights is None, num_classes)
    elif spec.startswith("hf:"):
        model, pre = _hf_model(spec[len("hf:"):], pretrained and weights is None, num_classes)
    elif ":" in spec:
        model, pre = _factory_model(spec, num_classes)
    else:
        raise StarfishError(
            f"unknown model '{spec}'. Built-ins: {', '.join(list_models())}; "
            "or use timm:<name>, torchvision:<name>, hf:<name or folder>, package.module:factory."
        )
    digest = None
    extra: dict = {}
    if weights is not None:
        stripped = load_weights(model, weights, spec)
        if stripped:
            extra["weights_prefix_stripped"] = stripped
        digest = sha256_of(weights)
    model.eval()
    return LoadedModel(model, spec, pre, str(weights) if weights else None, digest, extra=extra)


def parse_floats(text: str | Sequence[float]) -> tuple[float, ...]:
    if isinstance(text, str):
        return tuple(float(x) for x in text.split(","))
    return tuple(float(x) for x in text)
