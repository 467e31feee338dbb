"""Find a network's repeated blocks, where their residual stream is read, and its prunable weights.

Blocks are discovered without graph tracing: a block is a composite module that stands in a
container (``nn.Sequential``/``nn.ModuleList``) beside at least one sibling of the same class, and
that contains no such block itself. That finds timm ViT/DeiT ``blocks.N``, ``nn.TransformerEncoder``
``layers.N``, torchvision ViT ``encoder_layer_N``, ResNet ``layerK.N`` and most backbones; a regex
over module names overrides it. With one sample batch the blocks come in the order their forward
passes run, and ``stream_points`` says where each block's stream is read (its output in a chain;
the next module's input when residual adds happen outside the blocks, as in vit-pytorch).

Blocks (what healing aligns) and targets (what is pruned) are separate choices: ``--blocks`` never
changes the prunable weights; those come from the automatically discovered blocks or ``--include``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from starfish.nn.batch import batch_len, call_model, model_device, select, to_device
from starfish.nn.blockio import BlockCall, StopForward, first_tensor
from starfish.errors import StarfishError
from starfish.nn.hooks import forward_until, hooks

WEIGHTED_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PROBE_SAMPLES = 2  # samples of the one batch used to observe the forward order (models run in eval mode)


@dataclass(frozen=True)
class Target:
    """One prunable weight: the parameter's full name and the module that owns it."""

    name: str  # full parameter name, the key of the mask
    module_name: str
    param_name: str  # attribute on the module ("weight", "in_proj_weight", ...)

    def module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.module_name)


@dataclass(frozen=True)
class StreamPoint:
    """Where block ``block``'s state is read: the output of ``module`` or the input it receives."""

    block: str
    module: str
    side: str  # "output" | "input"

    def describe(self) -> str:
        if self.side == "output" and self.module == self.block:
            return "its output"
        return f"{self.side} of `{self.module or '(model)'}`"


def _has_child_with_params(module: nn.Module) -> bool:
    return any(any(True for _ in c.parameters()) for c in module.children())


def _has_own_forward(module: nn.Module) -> bool:
    """False for containers such as ModuleList/ModuleDict, which are never called (hooks never fire)."""
    return type(module).forward is not nn.Module.forward


def input_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The stream tensor a module was called with (first positional tensor or ``hidden_states``)."""
    try:
        return BlockCall(args, kwargs).stream
    except TypeError:
        try:
            return first_tensor(args)
        except TypeError:
            return None


def _children_pattern(pattern: str, module: nn.Module) -> str:
    return f"{pattern}\\.\\d+" if isinstance(module, nn.ModuleList) else f"{pattern}\\.\\w+"


def _matching(named: list[tuple[str, nn.Module]], pattern: str) -> list[tuple[str, nn.Module]]:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise StarfishError(f"--blocks '{pattern}' is not a valid regex ({exc}); pass a regex over module names.") from None
    found = [(n, m) for n, m in named if n and rx.fullmatch(n)]
    if not found:
        raise StarfishError(
            f"--blocks '{pattern}' matches no module; it is a regex that must match whole "
            f"module names, e.g. 'layers\\.\\d+' (first names: {', '.join(n for n, _ in named[1:6])})."
        )
    for name, module in found:
        if not _has_own_forward(module):
            raise StarfishError(
                f"--blocks '{pattern}' matches `{name}`, a {type(module).__name__} that is never called itself "
                f"(its hooks would never fire); match its children instead, e.g. --blocks '{_children_pattern(pattern, module)}'."
            )
    return found


def _discovered(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
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
    return [(n, m) for n, m in candidates if not any(o != n and o.startswith(n + ".") for o in names)]


def _probe(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return select(batch, slice(0, min(PROBE_SAMPLES, batch_len(batch))))


@torch.no_grad()
def run_eval(model: nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device | str | None) -> None:
    """One forward pass in eval mode (no BatchNorm statistics move), stopped early by StopForward."""
    was_training = model.training
    model.eval()
    try:
        forward_until(lambda: call_model(model, to_device(_probe(batch), device or model_device(model))))
    finally:
        model.train(was_training)


def _firing_order(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    batch: Mapping[str, torch.Tensor],
    device: torch.device | str | None,
    pattern: str | None,
) -> list[tuple[str, nn.Module]]:
    """The blocks in the order their forward passes start on ``batch``; blocks that never run are
    an error when the user named them and are dropped when discovery guessed them."""
    first: dict[str, int] = {}
    handles = []
    for name, module in blocks:

        def hook(_m, _args, name=name):
            first.setdefault(name, len(first))

        handles.append(module.register_forward_pre_hook(hook))
    with hooks(handles):
        run_eval(model, batch, device)
    idle = [n for n, _ in blocks if n not in first]
    if idle and pattern:
        raise StarfishError(
            f"--blocks '{pattern}' matches `{idle[0]}`, which never runs on a batch "
            f"({len(idle)} such module{'s' if len(idle) > 1 else ''}); match modules that the forward pass calls."
        )
    ran = [(n, m) for n, m in blocks if n in first]
    if not ran:
        raise StarfishError(
            "none of the discovered blocks runs on a batch; name the blocks with --blocks REGEX over module names."
        )
    return sorted(ran, key=lambda nm: first[nm[0]])


def find_blocks(
    model: nn.Module,
    pattern: str | None = None,
    batch: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> list[tuple[str, nn.Module]]:
    """The model's blocks: in forward order when a sample ``batch`` is given (the order hooks fire on
    it), otherwise in registration order (depth-first, which is forward order for most layouts)."""
    named = list(model.named_modules())
    found = _matching(named, pattern) if pattern else _discovered(named)
    if not found:
        raise StarfishError(
            "could not find repeated blocks in this model; name them with a block pattern "
            "(--blocks REGEX over module names)."
        )
    position = {name: i for i, (name, _) in enumerate(named)}
    found.sort(key=lambda nm: position[nm[0]])
    if batch is not None:
        found = _firing_order(model, found, batch, device, pattern)
    return found


def _inside(name: str, blocks: list[str]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in blocks)


def same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)


def stream_points(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    pattern: str | None = None,
    device: torch.device | str | None = None,
) -> list[StreamPoint]:
    """For each block (in forward order), where its stream is read, decided on one batch.

    In a chain the next block receives exactly this block's output: read the output. Otherwise
    (residual adds in the caller's loop, as in vit-pytorch, where blocks return branch increments)
    read the input of the next block, and for the last block the input of the first module that
    runs after it (the head), which is the stream itself.
    """
    blocks = find_blocks(model, pattern, batch, device)
    names = [n for n, _ in blocks]
    inputs: dict[str, torch.Tensor | None] = {}
    outputs: dict[str, torch.Tensor | None] = {}
    head: list[tuple[str, torch.Tensor | None]] = []
    handles = []
    for name, module in blocks:

        def pre(_m, args, kwargs, name=name):
            inputs.setdefault(name, input_tensor(args, kwargs))

        def post(_m, _args, output, name=name):
            if name not in outputs:
                try:
                    outputs[name] = first_tensor(output)
                except TypeError:
                    outputs[name] = None

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    for name, module in model.named_modules():
        if name and not _inside(name, names):

            def after_last(_m, args, kwargs, name=name):
                if names[-1] in outputs:  # the first module to run once the last block is done
                    head.append((name, input_tensor(args, kwargs)))
                    raise StopForward

            handles.append(module.register_forward_pre_hook(after_last, with_kwargs=True))
    with hooks(handles):
        run_eval(model, batch, device)
    points = []
    for i, name in enumerate(names):
        nxt_name, nxt_input = (names[i + 1], inputs.get(names[i + 1])) if i + 1 < len(names) else (head[0] if head else (None, None))
        out = outputs.get(name)
        if nxt_name is None or nxt_input is None or out is None or same_tensor(out, nxt_input):
            points.append(StreamPoint(name, name, "output"))
        elif i + 1 == len(names) and nxt_input.shape != out.shape and not any(p.side == "input" for p in points):
            # a chain ending in functional pooling (ResNet: avg_pool -> linear): the feature map is the state
            points.append(StreamPoint(name, name, "output"))
        else:
            points.append(StreamPoint(name, nxt_name, "input"))
    return points


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


def input_channels(model: nn.Module) -> int | None:
    """Channels the model's first convolution expects (None when it has no convolution)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(module.in_channels)
    return None


def prunable_targets(
    model: nn.Module,
    include: str | None = None,
    exclude: str | None = None,
    block_pattern: str | None = None,
) -> list[Target]:
    """Default: the Linear/Conv/attention weights inside the automatically discovered blocks (not
    stem, embedding or head).

    ``include`` (regex searched in parameter names) replaces the default set with every matching
    weight of the model; ``exclude`` removes matches from whichever set was chosen.
    ``block_pattern`` (--blocks) is accepted for existing callers but does not choose targets: it
    says what healing aligns, not what is pruned.
    """
    del block_pattern
    if include:
        rx = re.compile(include)
        targets = [t for t in all_weights(model) if rx.search(t.name)]
        if not targets:
            raise StarfishError(f"--include '{include}' matches no Linear/Conv/attention weight; it is a regex searched in parameter names.")
    else:
        blocks = [n for n, _ in _discovered(list(model.named_modules()))]
        if not blocks:
            raise StarfishError(
                "could not find repeated blocks to take the default prunable weights from; choose the weights "
                "with --include REGEX over parameter names (--blocks only chooses what healing aligns)."
            )
        targets = [t for t in all_weights(model) if _inside(t.module_name, blocks)]
    if exclude:
        rx = re.compile(exclude)
        targets = [t for t in targets if not rx.search(t.name)]
        if not targets:
            raise StarfishError(f"--exclude '{exclude}' removes every prunable weight; narrow it.")
    if not targets:
        raise StarfishError("the discovered blocks hold no Linear/Conv weights; choose the weights with --include REGEX over parameter names.")
    return targets
