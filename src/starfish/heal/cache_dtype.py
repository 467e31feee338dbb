"""The storage dtype of cached dense targets, chosen from the dense model's measured range.

float16 halves the cache at 10 mantissa bits but overflows to inf beyond 65,504, which some current
language models' hidden states exceed; bfloat16 has float32's range at 7 mantissa bits. ``auto``
(the default) runs the dense model once over the calibration samples (no gradients, the head left
out where the loss applies it itself), reads the largest magnitude of every signal a cache would
hold (each block's stream, the final hidden state or the logits) and picks float16 only when that
fits, else bfloat16. The pipeline does this before pruning, so a model that float16 cannot hold is
never refused after heavy work; an explicit ``float16`` that cannot hold the model is refused then,
naming the setting that works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from starfish.nn.batch import Batch, iter_batches, model_device, select, to_device
from starfish.errors import StarfishError

FLOAT16_MAX = float(torch.finfo(torch.float16).max)
CACHE_DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class CacheDtypeChoice:
    dtype: str  # float32 | float16 | bfloat16
    dense_peak: float | None  # largest magnitude of a cached signal on the calibration set (None: not measured)
    reason: str

    def to_dict(self) -> dict:
        return {"cache_dtype": self.dtype, "dense_peak": self.dense_peak, "reason": self.reason}


@torch.no_grad()
def dense_peak(dense: nn.Module, calibration: Batch, batch_size: int, block_pattern: str | None, precision: str = "fp32") -> float:
    """Largest |value| of every signal a target cache could hold, over the calibration samples."""
    from starfish.heal.runner import Runner
    from starfish.heal.vocab import head_route
    from starfish.nn.structure import stream_points

    device = model_device(dense)
    sample = to_device(select(calibration, slice(0, 2)), device)
    points = stream_points(dense, select(calibration, slice(0, 2)), block_pattern)
    run = Runner(dense, points, device, precision, needs_logits=True, head=head_route(dense, sample))
    was_training = dense.training
    dense.eval()
    peak = 0.0
    try:
        for batch in iter_batches(calibration, batch_size):
            out = run(batch)
            for signal in [*out.blocks, out.hidden, out.logits]:
                if signal is not None and signal.numel():
                    peak = max(peak, float(signal.abs().max()))
    finally:
        dense.train(was_training)
    return peak


def choose_cache_dtype(requested: str, peak: float | None) -> CacheDtypeChoice:
    """The dtype to cache targets in, from the request and the measured dense peak."""
    if requested not in CACHE_DTYPE_CHOICES:
        raise StarfishError(f"--cache-dtype must be one of {', '.join(CACHE_DTYPE_CHOICES)}; got '{requested}'.")
    fits = peak is not None and peak <= FLOAT16_MAX
    if requested == "float16" and peak is not None and not fits:
        raise StarfishError(
            f"the dense model's activations reach {peak:.4g} on the calibration set, beyond float16's range "
            f"({FLOAT16_MAX:g}); pass --cache-dtype bfloat16 (or auto, which picks it)."
        )
    if requested != "auto":
        return CacheDtypeChoice(requested, peak, "requested")
    if fits:
        return CacheDtypeChoice("float16", peak, f"auto: dense activations reach {peak:.4g}, within float16's range")
    if peak is None:
        return CacheDtypeChoice("bfloat16", None, "auto: dense range not measured, bfloat16 holds any range")
    return CacheDtypeChoice("bfloat16", peak, f"auto: dense activations reach {peak:.4g}, beyond float16's range ({FLOAT16_MAX:g})")


def resolve_cache_dtype(
    requested: str, dense: nn.Module, calibration: Batch, batch_size: int, block_pattern: str | None, precision: str = "fp32"
) -> CacheDtypeChoice:
    """Measure the dense range when the choice depends on it (auto or float16), then choose."""
    if requested in ("float32", "bfloat16"):
        return CacheDtypeChoice(requested, None, "requested")
    return choose_cache_dtype(requested, dense_peak(dense, calibration, batch_size, block_pattern, precision))
