"""Where the next layer reads a block's stream: after its input normalization.

``starfish_norm`` and ``starfish_kd`` align the normalised states (outlier channels of the raw
residual stream do not decide the loss); this finds those norms with hooks on named modules.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.nn.capture import record_stream
from starfish.nn.structure import StreamPoint, input_tensor, run_eval, same_tensor
from starfish.nn.hooks import hooks


def is_norm(module: nn.Module) -> bool:
    """A normalization layer by type (LayerNorm, RMSNorm, GroupNorm) or by class name (``LlamaRMSNorm``, ...)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(module).__name__.lower().endswith("norm")


@torch.no_grad()
def norm_points(
    model: nn.Module,
    points: list[StreamPoint],
    batch: Mapping[str, torch.Tensor],
    healer: str,
    device: torch.device | str | None = None,
) -> list[StreamPoint]:
    """Each block's point moved to what the next layer reads: the output of the first normalization
    module that receives the block's stream (a decoder layer's ``input_layernorm`` for the next
    block, the final norm for the last one). Found with hooks on one batch: a norm counts when the
    input it receives equals the tensor read at the block's point. Refused in one line when some
    block's stream reaches no norm (models without pre-norm blocks)."""
    received: dict[str, torch.Tensor | None] = {}
    handles = []
    for name, module in model.named_modules():
        if name and is_norm(module):

            def pre(_m, args, kwargs, name=name):
                received.setdefault(name, input_tensor(args, kwargs))

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    with hooks(handles), record_stream(model, points) as slots:
        run_eval(model, batch, device)
    moved = []
    for point, state in zip(points, slots):
        norm = next((n for n, seen in received.items() if same_tensor(seen, state)), None)
        if norm is None:
            raise StarfishError(
                f"healer '{healer}' aligns what the next layer reads after its input norm, but no normalization module "
                f"receives the stream of block `{point.block}`; use --healer starfish or nmse for this model."
            )
        moved.append(StreamPoint(point.block, norm, "output"))
    return moved
