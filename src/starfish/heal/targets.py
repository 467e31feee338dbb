"""Bounded storage for the dense model's outputs that healing trains against.

Only the signals the objective reads are kept (block outputs for STARFISH/NMSE, logits for KD),
in a compact dtype (float16 by default), and by default off the accelerator: pinned CPU memory
when the model computes on a GPU, so a ViT-B-size cache does not take the GPU memory the
training step needs. ``disk`` keeps them in memory-mapped files in a temporary folder that is
removed when healing ends, for calibration sets whose targets do not fit in RAM either.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from starfish.nn.batch import Batch, batch_len, iter_batches
from starfish.errors import StarfishError
from starfish.heal.objectives import Signals

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NUMPY_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}  # bf16 as raw bits
DISK = "disk"


def cache_location(requested: str | None, compute: torch.device) -> str:
    """Where targets live: the request, or pinned CPU memory beside an accelerator, else the compute device."""
    if requested in (None, "auto"):
        return "cpu" if compute.type != "cpu" else str(compute)
    return requested


class TensorStore:
    """Allocates ``(n, ...)`` tensors of one dtype in one place: a device, (pinned) CPU memory, or
    memory-mapped files. ``close`` deletes the files."""

    def __init__(self, location: str, dtype: torch.dtype, pin: bool = False) -> None:
        self.location = location
        self.dtype = dtype
        self.pin = pin and location == "cpu" and torch.cuda.is_available()
        self._folder: Path | None = None
        self._count = 0

    @property
    def on_disk(self) -> bool:
        return self.location == DISK

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        if not self.on_disk:
            return torch.empty(shape, dtype=self.dtype, device=self.location, pin_memory=self.pin)
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="starfish-targets-"))
        self._count += 1
        path = self._folder / f"{self._count}.bin"
        array = np.memmap(path, dtype=_NUMPY_STORAGE[self.dtype], mode="w+", shape=shape)
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self.dtype == torch.bfloat16 else tensor

    def write(self, store: torch.Tensor, start: int, values: torch.Tensor) -> None:
        """Copy ``values`` into rows ``start:`` of ``store``, refusing float16 overflow (it would be inf)."""
        if self.dtype == torch.float16 and values.is_floating_point():
            peak = float(values.detach().abs().max()) if values.numel() else 0.0
            if peak > torch.finfo(torch.float16).max:
                raise StarfishError(
                    f"a dense target reaches {peak:.3g}, beyond float16's range; pass --cache-dtype bfloat16 (or float32)."
                )
        store[start : start + values.shape[0]].copy_(values.detach().to(store.device, self.dtype))

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


class TargetCache:
    """The dense signals of every calibration sample, filled once, read back per minibatch.

    For a causal LM whose head the loss applies itself (``heal.vocab``), the final hidden state is
    kept instead of the logits ((n, tokens, hidden) rather than (n, tokens, vocabulary): 85 times
    smaller for SmolLM2), and ``head`` (the dense model's) turns it into logits chunk by chunk."""

    def __init__(
        self, blocks: list[torch.Tensor], logits: torch.Tensor | None, store: TensorStore, head: torch.nn.Module | None = None
    ) -> None:
        self.blocks = blocks
        self.logits = logits  # the logits, or the final hidden state when ``head`` is set
        self.store = store
        self.head = head

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        run_dense: Callable[[Batch], Signals],
        calibration: Mapping[str, torch.Tensor],
        batch_size: int,
        store: TensorStore,
        keep_logits: bool,
        progress: bool = False,
    ) -> "TargetCache":
        from tqdm.auto import tqdm

        n = batch_len(calibration)
        blocks: list[torch.Tensor] = []
        logits: torch.Tensor | None = None
        head = None
        start = 0
        batches = iter_batches(calibration, batch_size)
        for batch in tqdm(batches, total=-(-n // batch_size), desc="caching dense targets", disable=not progress, leave=False):
            out = run_dense(batch)
            if not blocks and out.blocks:
                blocks = [store.empty((n, *b.shape[1:])) for b in out.blocks]
            final = out.hidden if out.head is not None else out.logits  # what yields the logits
            head = out.head
            if keep_logits and logits is None and final is not None:
                logits = store.empty((n, *final.shape[1:]))
            for slot, value in zip(blocks, out.blocks):
                store.write(slot, start, value)
            if logits is not None and final is not None:
                store.write(logits, start, final)
            start += batch_len(batch)
        return cls(blocks, logits, store, head if keep_logits else None)

    def get(self, index: torch.Tensor, device: torch.device) -> Signals:
        """The cached signals of samples ``index`` on ``device``: block outputs in the cache's dtype (the
        block losses read them in float32 one block at a time, so a batch's targets are never all
        widened at once), the logits or final hidden state in float32."""
        index = index.to(self.blocks[0].device if self.blocks else (self.logits.device if self.logits is not None else "cpu"))

        def read(t: torch.Tensor) -> torch.Tensor:
            return t[index].to(device, non_blocking=True)

        final = read(self.logits).float() if self.logits is not None else None
        blocks = [read(b) for b in self.blocks]
        if self.head is not None:
            return Signals(blocks, None, hidden=final, head=self.head)
        return Signals(blocks, final)

    def nbytes(self) -> int:
        tensors = [*self.blocks, *([self.logits] if self.logits is not None else [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def close(self) -> None:
        self.blocks, self.logits = [], None
        self.store.close()
