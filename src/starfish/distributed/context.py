"""The process group of a ``torchrun`` launch: who this process is, and the collectives starfish needs.

One ``DistributedContext`` is active per process between ``start`` and ``stop``; code that must act
differently under data parallelism asks ``current()`` (``None`` in a one-process run, where every
helper here is the identity). Statistics are reduced as float64 sums so that N ranks compute the
same masks as one process; collectives are blocking and are reached in the same order by every
rank, because every rank walks the same model through the same pipeline.

Backends: gloo for CPU devices, NCCL for CUDA (device ``cuda:LOCAL_RANK``). The group has a finite
timeout (``STARFISH_DIST_TIMEOUT`` seconds, default 600) so that a rank left waiting in a collective
by a peer that died without closing its connection fails instead of waiting forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist

from starfish.errors import StarfishError

MODES = ("ddp", "fsdp")
TIMEOUT_ENV = "STARFISH_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the group. ``lockstep_forward``: every rank must take part in every
    forward call (FSDP gathers parameters inside forward), so uneven shares are padded."""

    mode: str
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def lockstep_forward(self) -> bool:
        return self.mode == "fsdp"

    def to_report(self) -> dict:
        return {"mode": self.mode, "world_size": self.world_size, "backend": self.backend}


_ACTIVE: DistributedContext | None = None


def current() -> DistributedContext | None:
    """The active context, or None in a one-process run."""
    return _ACTIVE


def is_writer() -> bool:
    """Whether this process writes outputs and prints results: rank 0, or the only process."""
    return _ACTIVE is None or _ACTIVE.is_writer


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise StarfishError(f"environment variable {name}={raw!r} is not a whole number; launch with torchrun.") from None


def plan_context(mode: str, device: str | None) -> DistributedContext:
    """Check the launch (torchrun's environment, the device, the backend) WITHOUT joining any group:
    everything that can fail here fails the same way on every rank, before a collective exists."""
    if mode not in MODES:
        raise StarfishError(f"--distributed must be one of {', '.join(MODES)}; got '{mode}'.")
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None or world is None or local is None:
        raise StarfishError(
            f"--distributed {mode} needs the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); "
            f"launch with 'torchrun --nproc-per-node N -m starfish ...'."
        )
    if not (0 <= rank < world) or local < 0:
        raise StarfishError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}.")
    name = device or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(name).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise StarfishError(f"--device {name} asked for CUDA, which this machine does not have; pass --device cpu.")
        if local >= torch.cuda.device_count():
            raise StarfishError(
                f"LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible); "
                f"start at most {torch.cuda.device_count()} processes per node."
            )
        return DistributedContext(mode, rank, world, local, "nccl", torch.device("cuda", local))
    if kind != "cpu":
        raise StarfishError(f"--distributed runs on CPU (gloo) or CUDA (nccl) devices; got --device {name}.")
    return DistributedContext(mode, rank, world, local, "gloo", torch.device("cpu"))


def timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw is not None else DEFAULT_TIMEOUT_S
    except ValueError:
        raise StarfishError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds.") from None
    if seconds <= 0:
        raise StarfishError(f"{TIMEOUT_ENV} must be a positive number of seconds; got {seconds:g}.")
    return timedelta(seconds=seconds)


def start(context: DistributedContext) -> DistributedContext:
    """Join the process group (torchrun's rendezvous) and make ``context`` the active one."""
    global _ACTIVE
    if context.backend == "nccl":
        torch.cuda.set_device(context.device)
    if not dist.is_initialized():
        dist.init_process_group(
            context.backend, rank=context.rank, world_size=context.world_size, timeout=timeout(),
            **({"device_id": context.device} if context.backend == "nccl" else {}),
        )
    _ACTIVE = context
    return context


def stop() -> None:
    """Leave the process group (idempotent)."""
    global _ACTIVE
    _ACTIVE = None
    if dist.is_initialized():
        dist.destroy_process_group()


def activate(context: DistributedContext | None) -> None:
    """Make ``context`` active in a group that is already initialised (tests that spawn their own)."""
    global _ACTIVE
    _ACTIVE = context


def compute_device(name: str | None) -> torch.device | None:
    """This rank's device for a device name of the run: ``auto`` and any ``cuda[:i]`` mean
    ``cuda:LOCAL_RANK`` under a CUDA launch; None in a one-process run (resolved as usual)."""
    if _ACTIVE is None:
        return None
    if name in (None, "auto") or torch.device(name).type == _ACTIVE.device.type:
        return _ACTIVE.device  # one GPU per rank, whatever index was named
    return torch.device(name)


# ---------------------------------------------------------------- collectives (identity without a group)

def _communication_device() -> torch.device:
    return _ACTIVE.device if _ACTIVE is not None and _ACTIVE.backend == "nccl" else torch.device("cpu")


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (through the backend's device) and return it."""
    if _ACTIVE is None or _ACTIVE.world_size == 1:
        return tensor
    wire = tensor.to(_communication_device())
    dist.all_reduce(wire, op=dist.ReduceOp.SUM)
    if wire is not tensor:
        tensor.copy_(wire)
    return tensor


def sum_floats(*values: float) -> list[float]:
    """Python numbers summed over all ranks, in float64 (counts, loss sums, metric tallies)."""
    if _ACTIVE is None or _ACTIVE.world_size == 1:
        return [float(v) for v in values]
    return sum_(torch.tensor([float(v) for v in values], dtype=torch.float64)).tolist()


def mean_over_ranks(values: dict[str, float | None]) -> dict[str, float | None]:
    """The mean over all ranks of each number (None stays None: the same keys are None on every rank).

    For decisions every rank must take alike from numbers that can differ between ranks, e.g. a
    held-out loss measured with each rank's own BatchNorm running statistics (train mode)."""
    if _ACTIVE is None or _ACTIVE.world_size == 1:
        return dict(values)
    keys = [k for k, v in values.items() if v is not None]
    sums = sum_floats(*(values[k] for k in keys))
    return {**values, **{k: total / _ACTIVE.world_size for k, total in zip(keys, sums)}}


def sum_tensors(tensors: Iterable[torch.Tensor | None], bucket_bytes: int = 32 * 2**20) -> None:
    """Sum several tensors over all ranks in place, a few large messages instead of one per tensor
    (bucketed by ``bucket_bytes``, grouped by dtype so nothing is converted)."""
    if _ACTIVE is None or _ACTIVE.world_size == 1:
        return
    pending: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if t is None:
            continue
        if pending and (t.dtype != pending[0].dtype or t.device != pending[0].device or size + t.numel() * t.element_size() > bucket_bytes):
            _sum_bucket(pending)
            pending, size = [], 0
        pending.append(t)
        size += t.numel() * t.element_size()
    if pending:
        _sum_bucket(pending)


def _sum_bucket(tensors: list[torch.Tensor]) -> None:
    flat = sum_(torch.cat([t.reshape(-1) for t in tensors]))
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
