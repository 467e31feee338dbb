"""Mixed precision for healing: autocast around the forward passes, float32 everywhere else.

Only the forward passes of the models run in reduced precision (``torch.autocast``): matrix
products and convolutions in bfloat16/float16, with the weights cast on the fly. The weights
themselves, their gradients and the optimizer state are float32 (the "master weights"; a model
loaded in float16/bfloat16 is widened for healing and narrowed back after, ``float32_master_weights``), and every loss is computed in float32 from signals
cast back to float32 (``as_float``), outside the autocast region. Pruned entries are exact zeros
in any dtype, so the mask contract does not depend on the precision.

``auto`` (the default) is float32 on a CPU and bfloat16 on a CUDA device that supports it;
``native`` (the language-model default) is bfloat16 wherever the hardware computes it natively: a
CUDA device as above, or a CPU with AMX tiles or AVX512-BF16, else float32:

* CPUs without AVX512-BF16/AMX gain nothing from bfloat16 (measured on the team's CPU: no faster),
  and float32 keeps CPU runs reproducible against earlier results (``auto`` stays float32 there);
* on a CPU with AMX, 16 kd steps of SmolLM2-135M (8 x 512 tokens) took 316 s under bfloat16
  autocast against 477 s in float32, with the same held-out perplexity (23.78 vs 23.76,
  benchmarks/LM_HEALER_SEARCH.md), so language models, whose heal is bound by matrix products,
  use it there;
* on GPUs bfloat16 halves activation memory and runs on tensor cores; it has float32's range, so
  it needs no loss scaling. float16 is opt-in only: its narrow range needs a ``GradScaler``
  (which ``LossScaler`` adds) and can still overflow in the forward pass.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator

import torch
from torch import nn

from starfish.masks import is_sharded

PRECISIONS = ("auto", "native", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX tiles or AVX512-BF16)."""
    checks = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision a run uses: the request; for ``auto`` bf16 on a bf16-capable CUDA device, else
    fp32; for ``native`` also bf16 on a CPU with native bf16 matrix units."""
    if requested not in ("auto", "native"):
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    if requested == "native" and device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: torch.device) -> ContextManager:
    """``torch.autocast`` for a reduced precision on ``device``; a no-op context for fp32."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def as_float(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A forward output as float32 (differentiable), so losses never run in reduced precision."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float32:
        return tensor
    return tensor.float()


@contextlib.contextmanager
def float32_master_weights(model: nn.Module) -> Iterator[dict[str, torch.dtype]]:
    """Heal a model loaded in float16/bfloat16 through float32 copies of its tensors, cast back on exit.

    Why: an optimizer step on float16 weights overflows (Adam's first step turned every trained
    weight NaN) and bfloat16 rounds small updates away, so half-precision weights never heal. While
    open, every floating parameter and buffer that is not float32 is float32 (updates accumulate
    there, optimizer state is float32); on exit each returns to the dtype it was loaded in. Pruned
    entries are exact zeros in every dtype. FSDP2 shards keep their dtype (``--distributed fsdp``
refuses float16). Yields ``{name: loaded dtype}`` of what was widened."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    lowered = {k: t.dtype for k, t in tensors.items() if t.is_floating_point() and t.dtype != torch.float32 and not is_sharded(t)}
    with torch.no_grad():
        for k in lowered:
            tensors[k].data = tensors[k].data.float()
    try:
        yield lowered
    finally:
        with torch.no_grad():
            for k, dtype in lowered.items():
                tensors[k].data = tensors[k].data.to(dtype)


class LossScaler:
    """Backward and optimizer step, with a ``GradScaler`` for fp16 (small gradients would flush to
    zero in float16) and plain ``backward``/``step`` otherwise. A step whose scaled gradients
    overflow is skipped by the scaler; the caller re-applies the masks either way."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    @classmethod
    def for_module(cls, config: object, module: nn.Module) -> "LossScaler":
        p = next(module.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        return cls(resolve_precision(getattr(config, "precision", "fp32"), device), device)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
