"""Device choice and peak-memory measurement, in one place."""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import sys
from pathlib import Path

import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    from starfish.distributed.context import compute_device

    ranked = compute_device(name)  # under torchrun: auto/cuda mean this rank's GPU
    if ranked is not None:
        return ranked
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status in MB (Linux); None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _return_free_heap() -> None:
    """Hand memory that earlier work freed back to the OS (glibc keeps freed heap pages resident),
    so the resident set a new window starts from is what is live, not what an earlier evaluation or
    healer left behind. A no-op where the C library has no ``malloc_trim``."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


MMAP_THRESHOLD = 1 << 20  # bytes: larger host allocations get pages of their own, returned to the OS when freed
# Block-wise healing of a language model under bf16 autocast allocates many tensors of 0.1-1 MB (one
# block's bf16 weight copies, bf16 activations of a batch); from the heap, their freed holes stayed
# resident: SmolLM2, Wanda 50%, 2 epochs at --precision native added 419 MB against a plan of 284 MB
# at 1 MB, 273 MB at 128 kB (BENCHMARKS.md, the native matrix). Smaller allocations cost a mapping each,
# so only that scope pays for it. The price, paired on that heal (benchmarks/heap_bound_cost.py): 168 s
# at 128 kB (plan/measured 0.96), 139 s at 1 MB (0.84), 81 s under glibc's dynamic threshold (0.47).
BLOCKWISE_MMAP_THRESHOLD = 128 << 10


def bound_heap_growth(threshold: int = MMAP_THRESHOLD) -> bool:
    """Give every host allocation of ``threshold`` bytes (default 1 MB) or more its own mapping,
    returned to the OS when freed.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), after which
    activations, logits chunks and gradients of that size come from the heap, whose freed holes stay
    resident: measured on a heal step, a 16 MB-per-chunk loss that holds 80 MB at a time grew the
    resident set by 1.2 GB. A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the
    dynamic adjustment off) keeps the resident set at what is live, so the memory plan holds on the
    CPU. Process-wide; a no-op (False) where the C library has no ``mallopt``.

    ``run`` and ``compare`` set it before their first pass, not only when healing starts: glibc
    serves a request from a free heap chunk large enough before it considers a new mapping, so the
    large blocks that pruning and evaluation freed under the dynamic threshold were reused by the
    heal and stayed resident after it freed them. Measured on SmolLM2 (block-wise after a Wanda
    pass, a joint heal and evaluations in one ``compare``): the heal added 305 MB where the plan said
    234 (``BENCHMARKS.md``, #24); paired in ``benchmarks/heap_bound_cost.py``, 499 MB without the
    bound against 243 MB with it."""
    try:
        return bool(ctypes.CDLL(None).mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def current_memory_mb(device: torch.device) -> float | None:
    """Memory held now: CUDA allocations, or the process's resident set (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_mb("VmRSS")


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window: CUDA's counters, or on Linux the kernel's peak-RSS mark
    (``/proc/self/clear_refs`` 5), so a heal reports its own peak, not the peak of whatever ran
    before it in the process (evaluation, pruning, an earlier healer of ``compare``). Returns
    whether the window was reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    _return_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


def peak_memory_mb(device: torch.device, since_reset: bool = False) -> tuple[float, str]:
    """Peak memory and what it measures (GPU allocations, or the whole process's resident set;
    ``since_reset``: the window that ``reset_peak_memory`` opened)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    peak = _status_mb("VmHWM") if since_reset else None
    if peak is not None:
        return peak, "process peak RSS during healing"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"


def free_host_bytes() -> int:
    """Memory the OS can still give this process: MemAvailable on Linux, else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_bytes(device: torch.device) -> int:
    """Free bytes on a CUDA device or in host memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return free_host_bytes()
