"""Find a network's repeated blocks and its prunable weights, by walking named modules.

Blocks are discovered without graph tracing: a block is a composite module that stands in a
container (``nn.Sequential``/``nn.ModuleList``) beside at least one sibling of the same class, and
that contains no such block itself. That finds timm ViT/DeiT ``blocks.N``, ``nn.TransformerEncoder``
``layers.N``, torchvision ViT ``encoder_layer_N``, ResNet ``layerK.N`` and most backbones; a regex
over module names overrides it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from starfish.errors import StarfishError

WEIGHTED_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Target:
    """One prunable weight: the parameter's full name and the module that owns it."""

    name: str  # full parameter name, the key of the mask
    module_name: str
    param_name: str  # attribute on the module ("weight", "in_proj_weight", ...)

    def module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.module_name)


def _has_child_with_params(module: nn.Module) -> bool:
    return any(any(True for _ in c.parameters()) for c in module.children())


def find_blocks(model: nn.Module, pattern: str | None = None) -> list[tuple[str, nn.Module]]:
    """The model's blocks in forward (registration) order."""
    named = list(model.named_modules())
    if pattern:
        rx = re.compile(pattern)
        found = [(n, m) for n, m in named if n and rx.fullmatch(n)]
        if not found:
            raise StarfishError(
                f"block pattern '{pattern}' matches no module; it is a regex that must match whole "
                f"module names, e.g. 'layers\\.\\d+' (first names: {', '.join(n for n, _ in named[1:6])})."
            )
        return found
    candidates: list[tuple[str, nn.Module]] = []
    for name, module in named:
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        children = list(module.named_children())
        by_type: dict[type, int] = {}
        for _, child in children:
            by_type[type(child)] = by_type.get(type(child), 0) + 1
        for child_name, child in children:
            if by_type[type(child)] >= 2 and _has_child_with_params(child):
                candidates.append((f"{name}.{child_name}" if name else child_name, child))
    names = [n for n, _ in candidates]
    innermost = [(n, m) for n, m in candidates if not any(o != n and o.startswith(n + ".") for o in names)]
    if not innermost:
        raise StarfishError(
            "could not find repeated blocks in this model; name them with a block pattern "
            "(--blocks REGEX over module names)."
        )
    return innermost


def _weights_of(module_name: str, module: nn.Module) -> list[Target]:
    prefix = f"{module_name}." if module_name else ""
    if isinstance(module, WEIGHTED_LEAVES):
        return [Target(prefix + "weight", module_name, "weight")]
    if isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight"] if module.in_proj_weight is not None else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        return [Target(prefix + n, module_name, n) for n in names]
    return []


def all_weights(model: nn.Module) -> list[Target]:
    """Every Linear/Conv weight and attention input projection of the model."""
    return [t for name, module in model.named_modules() for t in _weights_of(name, module)]


def prunable_targets(
    model: nn.Module,
    include: str | None = None,
    exclude: str | None = None,
    block_pattern: str | None = None,
) -> list[Target]:
    """Default: the Linear/Conv/attention weights inside the blocks (not stem, embedding or head).

    ``include`` (regex searched in parameter names) replaces the default set with every matching
    weight of the model; ``exclude`` removes matches from whichever set was chosen.
    """
    if include:
        rx = re.compile(include)
        targets = [t for t in all_weights(model) if rx.search(t.name)]
    else:
        blocks = [n for n, _ in find_blocks(model, block_pattern)]
        targets = [t for t in all_weights(model) if any(t.module_name == b or t.module_name.startswith(b + ".") for b in blocks)]
    if exclude:
        rx = re.compile(exclude)
        targets = [t for t in targets if not rx.search(t.name)]
    if not targets:
        raise StarfishError(
            "no prunable weights selected; loosen --include/--exclude (regexes over parameter names)."
        )
    return targets
