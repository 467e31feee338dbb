"""Masks as first-class objects: which entries of which weights survive.

A mask is keyed by the *parameter name* (``layer.0.conv1.weight``, or a packed attention
``self_attn.in_proj_weight``), so it can be saved, loaded and applied to a fresh copy of the model.
True = kept, False = pruned (must stay exactly zero).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from starfish.errors import StarfishError


class Masks:
    def __init__(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        self._masks: dict[str, torch.Tensor] = {k: v.bool() for k, v in (masks or {}).items()}

    # --- mapping-like access -------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self._masks[name] = mask.bool()

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

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Zero every pruned entry in place (idempotent)."""
        params = self._params(model)
        for k, m in self._masks.items():  # a fill, not a product: NaN or inf times 0 would stay non-zero
            params[k].masked_fill_(~m.to(params[k].device), 0)
        return model

    def violations(self, model: nn.Module) -> dict[str, int]:
        """Count of masked-out entries that are not exactly zero, per weight (empty = contract holds)."""
        params = self._params(model)
        bad = {}
        for k, m in self._masks.items():
            n = int((params[k].detach()[~m.to(params[k].device)] != 0).sum())
            if n:
                bad[k] = n
        return bad

    def register_gradient_masks(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Multiply gradients by the mask so pruned entries get no update signal."""
        params = self._params(model)
        handles = []
        for k, m in self._masks.items():
            p = params[k]
            mask = m.to(p.device, p.dtype)
            handles.append(p.register_hook(lambda g, mask=mask: g * mask))
        return handles

    def to(self, device: torch.device | str) -> "Masks":
        return Masks({k: v.to(device) for k, v in self._masks.items()})

    # --- persistence ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self._masks.items()}

    def save(self, path: str | Path) -> None:
        from starfish.outputs import write_safetensors

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
