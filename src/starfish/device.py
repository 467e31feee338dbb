"""Device choice and peak-memory measurement, in one place."""

from __future__ import annotations

import resource
import sys

import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    from starfish.distributed.context import compute_device

    ranked = compute_device(name)  # under torchrun: auto/cuda mean this rank's GPU
    if ranked is not None:
        return ranked
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory and what it measures (GPU allocations, or the whole process's resident set)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"
