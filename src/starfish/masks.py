"""Masks as first-class objects: which entries of which weights survive.

A mask is keyed by the *parameter name* (``layer.0.conv1.weight``, or a packed attention
``self_attn.in_proj_weight``), so it can be saved, loaded and applied to a fresh copy of the model.
True = kept, False = pruned (must stay exactly zero).

Sharded parameters (FSDP2 ``fully_shard`` makes every parameter a DTensor holding one shard per
rank) are handled shard by shard: each mask's local shard is cut once with the parameter's own
mesh and placements and kept beside it, ``apply_`` and ``mask_gradients_`` work in place on the
local shards (no communication), and ``violations`` adds the per-rank counts over the process
group, so on a sharded model it is collective: every rank must call it. Tensor hooks never fire
on FSDP2 parameters, so their gradients are masked explicitly (``mask_gradients_``) between the
backward pass and the optimizer step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from starfish.errors import StarfishError


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2 parameter or gradient): one shard lives on this rank."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


@torch.no_grad()
def local_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (a view that in-place writes reach), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def local_mask(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of the full ``mask`` that matches this rank's shard of ``param`` (``param`` itself when
    it is not sharded), on the shard's device. Cut where the mask lies (no communication, only the
    shard is copied to the accelerator) with the parameter's own mesh and placements, so it follows
    whatever sharding FSDP2 chose, uneven and empty shards included."""
    if not is_sharded(param):
        return mask.to(param.device)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shard = local_view(param)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = mask[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    if local.shape != shard.shape:
        raise StarfishError(
            f"the mask's local shard has shape {tuple(local.shape)} but this rank holds {tuple(shard.shape)} of the "
            "weight; shard the model with starfish.distributed.fsdp.shard_model."
        )
    return local.to(shard.device)


class Masks:
    def __init__(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        self._masks: dict[str, torch.Tensor] = {k: v.bool() for k, v in (masks or {}).items()}
        self._local: dict[str, torch.Tensor] = {}  # name -> this rank's mask shard, for sharded weights

    # --- mapping-like access -------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self._masks[name] = mask.bool()
        self._local.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def items(self):
        return self._masks.items()

    def names(self) -> list[str]:
        return list(self._masks)

    # --- statistics ------------------------------------------------------------------------
    def layer_sparsity(self) -> dict[str, float]:
        return {k: 1.0 - m.float().mean().item() for k, m in self._masks.items()}

    def sparsity(self) -> float:
        """Fraction of zeros over all masked weights together."""
        total = sum(m.numel() for m in self._masks.values())
        kept = sum(int(m.sum()) for m in self._masks.values())
        return 1.0 - kept / total if total else 0.0

    def numel(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    # --- model interaction --------------------------------------------------------------------
    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [k for k in self._masks if k not in params]
        if missing:
            raise StarfishError(
                f"masks name weights the model does not have ({', '.join(missing[:3])}); "
                "were the masks made for another architecture?"
            )
        for k, m in self._masks.items():
            if tuple(params[k].shape) != tuple(m.shape):
                raise StarfishError(f"mask for {k} has shape {tuple(m.shape)} but the weight is {tuple(params[k].shape)}.")
        return params

    def _shard_of(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The mask as it lines up with what this rank holds of ``param`` (cached for sharded weights)."""
        if not is_sharded(param):
            return self._masks[name].to(param.device)
        cached = self._local.get(name)
        shard = local_view(param)
        if cached is None or cached.shape != shard.shape or cached.device != shard.device:
            cached = self._local[name] = local_mask(self._masks[name], param)
        return cached

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Zero every pruned entry in place (idempotent); on a sharded weight, in this rank's shard."""
        params = self._params(model)
        for k in self._masks:  # a fill, not a product: NaN or inf times 0 would stay non-zero
            local_view(params[k]).masked_fill_(~self._shard_of(k, params[k]), 0)
        return model

    def violations(self, model: nn.Module) -> dict[str, int]:
        """Count of masked-out entries that are not exactly zero, per weight (empty = contract holds).

        On a model with sharded weights the counts are summed over every rank of their process group
        (a collective: every rank calls it, and every rank gets the same answer)."""
        params = self._params(model)
        names = list(self._masks)
        counts = torch.tensor(
            [int((local_view(params[k]).detach()[~self._shard_of(k, params[k])] != 0).sum()) for k in names],
            dtype=torch.int64,
        )
        sharded = [i for i, k in enumerate(names) if is_sharded(params[k])]
        if sharded:  # FSDP2 over one mesh: one process group holds every shard
            import torch.distributed as dist

            first = params[names[sharded[0]]]
            part = counts[sharded].to(local_view(first).device)  # NCCL reduces on the GPU, gloo on the CPU
            dist.all_reduce(part, group=first.device_mesh.get_group())
            counts[sharded] = part.cpu()
        return {k: int(n) for k, n in zip(names, counts.tolist()) if n}

    def register_gradient_masks(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Multiply gradients by the mask so pruned entries get no update signal.

        Sharded (FSDP2) weights get no hook (tensor hooks never fire on them); ``mask_gradients_``
        masks their gradients after the backward pass."""
        params = self._params(model)
        handles = []
        for k, m in self._masks.items():
            p = params[k]
            if is_sharded(p):
                continue
            mask = m.to(p.device, p.dtype)
            handles.append(p.register_hook(lambda g, mask=mask: g * mask))
        return handles

    @torch.no_grad()
    def mask_gradients_(self, model: nn.Module) -> None:
        """Zero the gradient of every pruned entry in place (this rank's shard of a sharded weight).

        Call it between ``backward`` and ``optimizer.step``: it is what keeps the optimizer state of
        pruned entries at zero where gradient hooks do not run (FSDP2), and a no-op where they did."""
        params = self._params(model)
        for k in self._masks:
            grad = params[k].grad
            if grad is not None:
                local_view(grad).masked_fill_(~self._shard_of(k, params[k]), 0)

    def to(self, device: torch.device | str) -> "Masks":
        return Masks({k: v.to(device) for k, v in self._masks.items()})

    # --- persistence ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self._masks.items()}

    def save(self, path: str | Path) -> None:
        from starfish.common.outputs import write_safetensors

        meta = {"format": "starfish-masks", "true_means": "kept", "order": json.dumps(self.names())}
        write_safetensors(self.state_dict(), path, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Masks":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise StarfishError(f"masks file {path} does not exist; pass the masks.safetensors of a starfish run.")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                order = json.loads((f.metadata() or {}).get("order", "[]"))
        except Exception as exc:  # SafetensorError, truncated or non-safetensors files, bad metadata
            raise StarfishError(
                f"masks file {path} is not a readable safetensors file ({str(exc).splitlines()[0]}); "
                "pass the masks.safetensors of a starfish run."
            ) from None
        for name, tensor in tensors.items():
            if tensor.dtype != torch.bool:
                raise StarfishError(
                    f"mask {name} in {path} is {str(tensor.dtype).removeprefix('torch.')}, not boolean; masks hold "
                    "True = kept / False = pruned (save them with Masks.save or torch.bool tensors)."
                )
        order = [n for n in order if isinstance(n, str)] if isinstance(order, list) else []
        names = [n for n in order if n in tensors] + [n for n in tensors if n not in order]
        return cls({n: tensors[n] for n in names})  # forward order survives the round trip
