"""Hugging Face causal language models as starfish models: load, describe, save.

A causal LM is loaded from a local ``save_pretrained`` folder (or the hub cache) with
``AutoModelForCausalLM`` plus its tokenizer. Two adaptations keep the rest of starfish
architecture-agnostic:

* GPT-2-style ``Conv1D`` layers store their weight as (in, out). They are swapped at load for an
  equivalent ``nn.Linear`` subclass (``CheckpointConv1D``, weight (out, in)) so every pruner sees
  the input axis where it sees it for any Linear; ``checkpoint_state``/``checkpoint_masks`` turn
  weights and masks back into the checkpoint's layout when saving.
* Mixture-of-experts models whose experts are fused 3-D tensors are refused: starfish prunes 2-D
  Linear weights, and skipping the experts silently would misreport the achieved sparsity.

Blocks are the decoder layers; prunable weights are the Linear weights inside them, so the
embeddings, the final norm and ``lm_head`` stay dense.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.masks import Masks

CAUSAL_LM = "causal-lm"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_DEFAULT_CONTEXT = 2048  # the literature's evaluation window; longer contexts are capped to it

# Decoder-layer containers of the common families, tried in order (regexes over module names).
DECODER_BLOCK_PATTERNS = (
    r"model\.layers\.\d+",  # Llama, SmolLM, Qwen2/3, Mistral, Gemma, Phi-3
    r"transformer\.h\.\d+",  # GPT-2, GPT-J, Falcon, BLOOM
    r"model\.decoder\.layers\.\d+",  # OPT
    r"gpt_neox\.layers\.\d+",  # Pythia / GPT-NeoX
    r"transformer\.blocks\.\d+",  # MPT
)


class CheckpointConv1D(nn.Linear):
    """An ``nn.Linear`` that replaced a transformers ``Conv1D``: same function, weight (out, in).

    Its checkpoint stores the weight transposed, (in, out); saving transposes it back."""


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise StarfishError(f"dtype must be one of {', '.join(DTYPES)}; got '{name}'.")
    return DTYPES[name]


def read_hf_config(name: str):
    try:
        from transformers import AutoConfig
    except ImportError:
        raise StarfishError("hf:<name> needs the transformers package: pip install 'starfish-heal[hf]'.") from None
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise StarfishError(
            f"Hugging Face model '{name}' is not available ({str(exc).splitlines()[0]}); "
            "pass a local folder made with save_pretrained, or download it first."
        ) from None


def is_causal_lm_config(config) -> bool:
    """True when the config names a ``*ForCausalLM`` architecture, or (without architectures)
    when its type has a causal-LM head in transformers and no image-classification head."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    kind = type(config)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING and kind not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING


def refuse_unsupported_hf(spec: str, config) -> None:
    """An ``hf:`` model that is neither a causal LM nor an image classifier (a masked LM, a sequence
    classifier) is refused naming what is supported, before its weights are read."""
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForImageClassification") for a in archs):
        raise StarfishError(
            f"{spec} is a {archs[0]}; starfish supports Hugging Face causal language models (*ForCausalLM, "
            "*LMHeadModel) and image classifiers (*ForImageClassification): pass one of those."
        )


def is_causal_lm(name: str) -> bool:
    """Whether ``hf:<name>`` is a causal language model (reads only its config)."""
    return is_causal_lm_config(read_hf_config(name))


def decoder_block_pattern(model: nn.Module) -> str:
    """The regex naming the model's decoder layers (the first known pattern that matches)."""
    names = [n for n, _ in model.named_modules()]
    for pattern in DECODER_BLOCK_PATTERNS:
        rx = re.compile(pattern)
        if any(rx.fullmatch(n) for n in names):
            return pattern
    raise StarfishError(
        f"{type(model).__name__}: no known decoder-layer container ({', '.join(DECODER_BLOCK_PATTERNS)}); "
        "name the blocks with --blocks REGEX."
    )


def refuse_fused_experts(model: nn.Module, block_pattern: str) -> None:
    """Raise on weights of 3 or more dimensions inside the decoder layers (fused MoE experts)."""
    rx = re.compile(block_pattern)
    blocks = [n for n, _ in model.named_modules() if rx.fullmatch(n)]
    fused = [
        f"{n} {tuple(p.shape)}"
        for n, p in model.named_parameters()
        if p.dim() >= 3 and any(n.startswith(b + ".") for b in blocks)
    ]
    if fused:
        raise StarfishError(
            f"{type(model).__name__} stores mixture-of-experts weights as fused 3-D tensors ({fused[0]}"
            f"{f' +{len(fused) - 1} more' if len(fused) > 1 else ''}), which starfish cannot prune yet; "
            "use a dense (non-MoE) causal LM."
        )


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Swap every transformers ``Conv1D`` for an equivalent ``CheckpointConv1D``; return their names."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return []
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        n_in, n_out = module.weight.shape
        linear = CheckpointConv1D(n_in, n_out, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=module.weight.requires_grad)
        if module.bias is not None:
            linear.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        swapped.append(name)
    return swapped


def transposed_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, CheckpointConv1D)]


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in its checkpoint's layout (Conv1D weights back to (in, out))."""
    state = dict(model.state_dict())
    for name in transposed_modules(model):
        key = f"{name}.weight"
        state[key] = state[key].t().contiguous()
    return state


def checkpoint_masks(model: nn.Module, masks: Masks) -> Masks:
    """Masks keyed by the checkpoint's parameter names, in the checkpoint's layout."""
    transposed = {f"{n}.weight" for n in transposed_modules(model)}
    return Masks({k: (m.t().contiguous() if k in transposed else m) for k, m in masks.items()})


def load_checkpoint_masks(model: nn.Module, path: str | Path) -> Masks:
    """Masks saved by ``save_hf_folder`` (checkpoint layout) in the layout of a model loaded by
    ``create_model`` (transposing is its own inverse, so the same conversion applies)."""
    return checkpoint_masks(model, Masks.load(path))


def context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_seq_len(model: nn.Module) -> int:
    """The evaluation window: the model's context, capped at 2048 tokens."""
    context = context_length(getattr(model, "config", None))
    return min(context, MAX_DEFAULT_CONTEXT) if context else MAX_DEFAULT_CONTEXT


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(name: str):
    """The tokenizer saved with the model, or None when a local folder has none (transformers would
    otherwise hand back an empty tokenizer of the architecture's class)."""
    from transformers import AutoTokenizer

    if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as exc:
        raise StarfishError(
            f"cannot load the tokenizer of '{name}' ({str(exc).splitlines()[0]}); save a working one beside "
            "the model (tokenizer.save_pretrained(folder))."
        ) from None


def load_causal_lm(name: str, dtype: str | None = None) -> tuple[nn.Module, object, str]:
    """(model in eval mode, tokenizer or None, block pattern) for a local folder or a cached hub id."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # starfish shows its own progress; loading bars only add noise
    torch_dtype = parse_dtype(dtype) or torch.float32
    tokenizer = load_tokenizer(name)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise StarfishError(
            f"could not load causal LM '{name}' ({str(exc).splitlines()[0]}); "
            "pass a folder made with save_pretrained."
        ) from None
    except Exception as exc:  # a truncated or random safetensors file, a pickle payload torch refuses to run
        raise StarfishError(unreadable_weights(name, exc)) from None
    check_loading_info(name, info)
    check_finite_weights(model, name, dtype)
    pattern = decoder_block_pattern(model)
    refuse_fused_experts(model, pattern)
    linearize_conv1d(model)
    return model.eval(), tokenizer, pattern


def unreadable_weights(name: str, exc: Exception) -> str:
    """The one line for weight files transformers could not read."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return (
        f"could not read the weight files of '{name}' ({type(exc).__name__}: {first}); "
        "replace them with intact ones (model.save_pretrained(folder))."
    )


def check_loading_info(name: str, info: Mapping[str, object]) -> None:
    """Load strictly: a tensor the checkpoint lacks would be random (transformers initialises it
    anew) and one it has extra would be dropped. Tied weights are not reported missing."""
    problems = []
    for label, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("of another shape", "mismatched_keys")):
        names = sorted(str(k) for k in info.get(key) or ())
        if names:
            more = f" +{len(names) - 2} more" if len(names) > 2 else ""
            problems.append(f"{label}: {', '.join(names[:2])}{more}")
    if problems:
        raise StarfishError(
            f"the weights in '{name}' do not fit its config.json ({'; '.join(problems)}); "
            "pass the folder save_pretrained wrote for this architecture, unchanged."
        )


def check_finite_weights(model: nn.Module, name: str, dtype: str | None = None) -> None:
    """Refuse NaN or infinite weights, also values beyond the range of the dtype asked for."""
    from starfish.common.validation import first_non_finite

    bad = first_non_finite(model.state_dict().items())
    if bad is not None:
        narrowed = f" once loaded in {dtype}" if dtype not in (None, "float32") else ""
        fix = " or load it in float32 (--dtype float32)" if narrowed else ""
        raise StarfishError(f"the weights in '{name}' hold NaN or infinite values{narrowed} (first in '{bad}'); pass intact weights{fix}.")


def save_hf_folder(
    model: nn.Module,
    tokenizer,
    folder: str | Path,
    masks: Masks | None = None,
    masks_path: str | Path | None = None,
) -> Path:
    """Write ``folder`` so ``AutoModelForCausalLM.from_pretrained(folder)`` loads it as it is.

    Weights go in the checkpoint's layout as safetensors (pruned entries exactly zero; no
    ``sparsity_config`` in config.json). With ``masks``, the contract is checked first and the masks
    are written to ``masks_path`` (default ``folder/masks.safetensors``) under the checkpoint's names.
    """
    folder = Path(folder)
    if masks is not None:
        bad = masks.violations(model)
        if bad:
            raise StarfishError(f"refusing to save: {len(bad)} weights have non-zero pruned entries ({next(iter(bad))}).")
    config = getattr(model, "config", None)
    if config is not None:
        config.__dict__.pop("sparsity_config", None)  # loaders would read it as compressed weights
    model.save_pretrained(folder, state_dict=checkpoint_state(model))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if masks is not None:
        checkpoint_masks(model, masks).save(Path(masks_path) if masks_path else folder / "masks.safetensors")
    return folder


def tokenizer_of(extra: Mapping[str, object]):
    """The tokenizer a ``LoadedModel`` of a causal LM carries (``loaded.extra``)."""
    tok = extra.get("tokenizer")
    if tok is None:
        raise StarfishError(
            "this causal LM has no tokenizer, so text cannot be turned into tokens; save one into the "
            "model folder (tokenizer.save_pretrained(folder))."
        )
    return tok
