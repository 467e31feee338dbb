"""What a prunable weight does to its input, and how to watch it happen on calibration data.

Pruners (Wanda, SparseGPT), repairs (variance matching) and the RR diagnosis all need the same
three facts about a target weight: the input it sees (as a matrix whose columns line up with the
weight's flattened input dimension), the output it produces (with channels on a known axis), and
that output recomputed with another weight. This module answers those for Linear, Conv and the
packed/unpacked attention input projections, so callers never special-case layer types.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from starfish.errors import StarfishError
from starfish.structure import Target

_QKV = {"q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2}


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the needed activation has been seen."""


@contextmanager
def no_fastpath() -> Iterator[None]:
    """Disable the fused Transformer fast path, which bypasses submodules (and their hooks)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def target_input(target: Target, args: tuple) -> torch.Tensor:
    """The tensor a target weight multiplies, from its module's positional inputs."""
    index = _QKV.get(target.param_name, 0)
    if len(args) <= index or not isinstance(args[index], torch.Tensor):
        raise StarfishError(f"cannot see the input of {target.name}; call its module with positional tensors.")
    return args[index]


def _bias(module: nn.Module, target: Target) -> torch.Tensor | None:
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_bias is None:
            return None
        if target.param_name == "in_proj_weight":
            return module.in_proj_bias
        d = module.embed_dim
        i = _QKV[target.param_name]
        return module.in_proj_bias[i * d : (i + 1) * d]
    return getattr(module, "bias", None)


def layer_output(module: nn.Module, target: Target, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The target's own output for input ``x`` if its weight were ``weight`` (bias included)."""
    bias = _bias(module, target)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module._conv_forward(x, weight, bias)
    return F.linear(x, weight, bias)


def channel_axis(module: nn.Module) -> int:
    """Axis of the output that indexes the weight's rows (output channels)."""
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


def channels_last_2d(y: torch.Tensor, axis: int) -> torch.Tensor:
    """(samples, channels) view of an output, every position/token counted as a sample."""
    if axis != -1:
        y = y.movedim(axis, -1)
    return y.reshape(-1, y.shape[-1])


def input_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(samples, in_features) with columns in the order of ``weight.flatten(1)``."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str):
            raise StarfishError(
                f"grouped or string-padded convolutions are not supported by calibration-based pruners; "
                "exclude them with --exclude or use --pruner magnitude."
            )
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        raise StarfishError("calibration-based pruners support Linear, Conv2d and attention weights; use --pruner magnitude.")
    return x.reshape(-1, x.shape[-1])


def _explicit_mha_forward(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """Self-contained attention that calls ``self.out_proj`` as a module, so its hooks fire.

    PyTorch's own forward passes ``out_proj.weight`` to a functional kernel and never calls the
    ``out_proj`` module; this equivalent (eval-mode, no key padding mask) makes it observable.
    """
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    bsz, tgt, d = query.shape
    h = self.num_heads
    if self.in_proj_weight is not None:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
    b_q = b_k = b_v = None
    if self.in_proj_bias is not None:
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    split = lambda t: t.reshape(bsz, t.shape[1], h, d // h).transpose(1, 2)  # noqa: E731
    mask = attn_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = ~mask  # nn.MultiheadAttention: True = masked out; SDPA: True = attend
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, is_causal=bool(is_causal and mask is None))
    out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt, d))
    if not self.batch_first:
        out = out.transpose(0, 1)
    return out, None


@contextmanager
def observable_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily route every supported ``nn.MultiheadAttention`` through ``_explicit_mha_forward``."""
    import types

    patched = []
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn:
            original = module.forward

            def forward(self, query, key, value, key_padding_mask=None, *args, _original=original, **kwargs):
                if key_padding_mask is not None or self.training:
                    return _original(query, key, value, key_padding_mask, *args, **kwargs)
                return _explicit_mha_forward(self, query, key, value, None, *args, **kwargs)

            module.forward = types.MethodType(forward, module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def batches(calibration: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, calibration.shape[0], batch_size):
        yield calibration[i : i + batch_size]


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def watch(
    model: nn.Module,
    targets: list[Target],
    calibration: torch.Tensor,
    visit: Callable[[int, nn.Module, torch.Tensor], None],
    batch_size: int = 64,
    stop_after: int | None = None,
) -> None:
    """Run the model on calibration data; call ``visit(i, module, input)`` for target i.

    ``stop_after`` ends each forward pass right after target ``stop_after`` was visited (saves
    the rest of the network when only an early layer is needed).
    """
    device = model_device(model)
    handles = []
    for i, target in enumerate(targets):
        module = target.module(model)

        def hook(mod, args, i=i, target=target):
            visit(i, mod, target_input(target, args))
            if stop_after is not None and i == stop_after:
                raise StopForward

        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with no_fastpath(), observable_attention(model):
            for x in batches(calibration, batch_size):
                try:
                    model(x.to(device))
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def forward_order(model: nn.Module, targets: list[Target], sample: torch.Tensor) -> list[Target]:
    """Targets sorted by when their module first runs (a packed attention module runs once)."""
    first: dict[str, int] = {}
    counter = [0]

    def visit(i, module, x):
        first.setdefault(targets[i].name, counter[0])
        counter[0] += 1

    watch(model, targets, sample[:1], visit, batch_size=1)
    return sorted(targets, key=lambda t: first.get(t.name, len(first) + targets.index(t)))
