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

from starfish.nn.batch import calibration_set, call_model, iter_batches, model_device, position_weights, to_device
from starfish.nn.blockio import StopForward
from starfish.errors import StarfishError
from starfish.nn.structure import Target
from starfish.nn.hooks import forward_until, hooks

_QKV = {"q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2}

# visit(i, module, input, weights): ``weights`` are the batch's per-position weights (None for images)
Visit = Callable[[int, nn.Module, torch.Tensor, "torch.Tensor | None"], None]


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
                "grouped or string-padded convolutions are not supported by calibration-based pruners; "
                "exclude them with --exclude or use --pruner magnitude."
            )
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        raise StarfishError("calibration-based pruners support Linear, Conv2d and attention weights; use --pruner magnitude.")
    return x.reshape(-1, x.shape[-1])


def real_rows(rows: torch.Tensor, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``rows`` (one per position of ``x``, as ``input_matrix``/``channels_last_2d`` make them for a
    token input) without the padding positions: statistics over tokens count real tokens only.

    ``weights`` are the batch's (N, L) position weights; they apply when the positions of ``x`` are
    (N, L) (batch first) or (L, N). Anything else (images, convolutions) keeps every row.
    """
    if weights is None or x.dim() < 2:
        return rows
    prefix = tuple(x.shape[:-1])
    w = weights.to(x.device)
    if prefix == tuple(w.shape):
        flat = w.reshape(-1)
    elif prefix == tuple(w.T.shape):
        flat = w.T.reshape(-1)
    else:
        return rows
    return rows if rows.shape[0] != flat.shape[0] else rows[flat > 0]


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


@contextmanager
def hooked_targets(model: nn.Module, targets: list[Target], visit: Visit, weights: list, stop_after: int | None = None) -> Iterator[None]:
    """Forward pre-hooks calling ``visit(i, module, input, weights[0])`` for target i; ``weights`` is
    a one-element list the caller updates with the current batch's position weights."""
    handles = []
    for i, target in enumerate(targets):
        module = target.module(model)

        def hook(mod, args, i=i, target=target):
            visit(i, mod, target_input(target, args), weights[0])
            if stop_after is not None and i == stop_after:
                raise StopForward

        handles.append(module.register_forward_pre_hook(hook))
    with hooks(handles):
        yield


@contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode with every submodule observable (no fused fast paths), restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with no_fastpath(), observable_attention(model):
            yield
    finally:
        model.train(was_training)


@torch.no_grad()
def watch(
    model: nn.Module,
    targets: list[Target],
    calibration: object,
    visit: Callable[..., None],
    batch_size: int = 64,
    stop_after: int | None = None,
    weighted: bool = False,
) -> None:
    """Run the whole model on calibration data (a mapping or an image tensor) through ``call_model``;
    call ``visit(i, module, input)`` for target i (``visit(i, module, input, position_weights)``
    when ``weighted``).

    ``stop_after`` ends each forward pass right after target ``stop_after`` was visited (saves
    the rest of the network when only an early layer is needed).
    """
    device = model_device(model)
    current: list = [None]
    call = visit if weighted else (lambda i, module, x, w: visit(i, module, x))
    with evaluation(model), hooked_targets(model, targets, call, current, stop_after):
        for batch in iter_batches(calibration_set(calibration), batch_size):
            current[0] = position_weights(batch)
            forward_until(lambda batch=batch: call_model(model, to_device(batch, device)))


def forward_order(model: nn.Module, targets: list[Target], sample: object) -> list[Target]:
    """Targets sorted by when their module first runs (a packed attention module runs once)."""
    first: dict[str, int] = {}
    counter = [0]

    def visit(i, module, x):
        first.setdefault(targets[i].name, counter[0])
        counter[0] += 1

    one = {k: v[:1] for k, v in calibration_set(sample).items()}
    watch(model, targets, one, visit, batch_size=1)
    return sorted(targets, key=lambda t: first.get(t.name, len(first) + targets.index(t)))
