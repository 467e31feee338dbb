"""Per-block cosine alignment with the dense model: where pruning hurt and where healing helped.

For every block, the mean cosine similarity between the sparse and the dense block outputs on the
same images (tokens compared one by one; feature maps compared as whole flattened maps, exactly
as the STARFISH objective measures them). 1.0 means the block behaves like the dense one.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from starfish.nn.batch import Batch, as_batch, batch_len, call_model, iter_batches, select, to_device
from starfish.data.images import item_pair
from starfish.nn.device import resolve_device
from starfish.nn.capture import record_stream
from starfish.heal.objectives import cosine_distance
from starfish.nn.structure import stream_points


class DenseReference:
    """The dense model's block outputs on fixed inputs, to compare sparse models against.

    ``cache=True`` computes them once, so many sparse models are compared cheaply (a compare grid
    measures every healer on the same inputs); ``cache=False`` recomputes them batch by batch, so
    memory stays at one batch of block outputs (a single run at 224 px: 256 cached probe images
    of every block would take gigabytes)."""

    @torch.no_grad()
    def __init__(
        self,
        dense: nn.Module,
        images: torch.Tensor | Mapping[str, torch.Tensor],
        block_pattern: str | None = None,
        batch_size: int = 128,
        device: str | torch.device = "auto",
        cache: bool = True,
    ) -> None:
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.inputs = as_batch(images)  # the fixed probe set (small), as a Batch mapping
        self.batch_size = batch_size
        self.dense = dense
        was_training = dense.training
        dense.to(self.device).eval()
        try:
            self.points = stream_points(dense, select(self.inputs, slice(0, 2)), block_pattern, self.device)
        finally:
            dense.train(was_training)
        self.names = [p.block for p in self.points]
        self.outputs: list[list[torch.Tensor]] | None = None  # per batch, per block (kept on CPU)
        if cache:
            self.outputs = [self._stream(dense, batch) for batch in iter_batches(self.inputs, batch_size)]

    @torch.no_grad()
    def _stream(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The state read at every alignment point for one batch (eval mode, on the CPU)."""
        was_training = model.training
        model.to(self.device).eval()
        try:
            with record_stream(model, self.points) as out:
                call_model(model, to_device(batch, self.device))
            return [o.float().cpu() for o in out]
        finally:
            model.train(was_training)

    @torch.no_grad()
    def alignment(self, sparse: nn.Module) -> dict[str, float]:
        """{block name: mean cosine(sparse block output, dense block output)} over the inputs."""
        totals = torch.zeros(len(self.names), dtype=torch.float64)
        count = 0
        for b, batch in enumerate(iter_batches(self.inputs, self.batch_size)):
            n = batch_len(batch)
            dense_out = self.outputs[b] if self.outputs is not None else self._stream(self.dense, batch)
            for j, (s, d) in enumerate(zip(self._stream(sparse, batch), dense_out)):
                totals[j] += (1.0 - cosine_distance(s, d)).item() * n
            count += n
        return {n: float(totals[j] / max(count, 1)) for j, n in enumerate(self.names)}


def block_alignment(
    dense: nn.Module,
    sparse: nn.Module,
    images: torch.Tensor | Mapping[str, torch.Tensor],
    block_pattern: str | None = None,
    batch_size: int = 32,
    device: str | torch.device = "auto",
) -> dict[str, float]:
    """{block name: mean cosine(sparse block output, dense block output)} over ``images``, one batch
    of block outputs in memory at a time."""
    return DenseReference(dense, images, block_pattern, batch_size, device, cache=False).alignment(sparse)


def probe_sample(data: Dataset | Mapping[str, torch.Tensor], seed: int, size: int) -> Batch:
    """A seeded subset of at most ``size`` samples, decoding only those (model inputs; labels dropped)."""
    n = batch_len(data) if isinstance(data, Mapping) else len(data)  # type: ignore[arg-type]
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
    if isinstance(data, Mapping):
        return {k: v for k, v in select(data, pick).items() if k != "labels"}
    return {"pixel_values": torch.stack([item_pair(data[int(i)])[0] for i in pick])}


class AlignmentProbe:
    """A fixed, seeded set of samples on which a run measures alignment before and after healing.

    Held-out samples are preferred (alignment on the calibration samples would flatter the healer
    that trained on them); the evaluation set is never used, since it is read only for the final
    scoring, and labels are never used. Only the probe's own samples are decoded.
    """

    def __init__(self, images: torch.Tensor | Batch, source: str) -> None:
        self.images = images
        self.source = source

    @classmethod
    def choose(cls, held_out: Dataset | Mapping[str, torch.Tensor] | None, calibration: Dataset | Mapping[str, torch.Tensor] | None, seed: int, size: int = 256) -> "AlignmentProbe | None":
        for data, source in ((held_out, "held-out"), (calibration, "calibration")):
            n = 0 if data is None else (batch_len(data) if isinstance(data, Mapping) else len(data))  # type: ignore[arg-type]
            if n > 0:
                probe = probe_sample(data, seed, size)  # type: ignore[arg-type]
                return cls(probe, f"{batch_len(probe)} {source} images (seeded random subset, labels unused)")
        return None

    @classmethod
    def from_sequences(cls, sequences: Mapping[str, torch.Tensor], source: str, count: int = 4, tokens: int = 256) -> "AlignmentProbe":
        """The first tokens of the first sequences: block outputs of a long sequence for every block of
        a language model would take far more memory than the measurement is worth."""
        ids = sequences["input_ids"][:count, :tokens]
        mask = sequences.get("attention_mask")
        mask = mask[:count, :tokens] if mask is not None else torch.ones_like(ids)
        return cls({"input_ids": ids, "attention_mask": mask}, f"first {ids.shape[1]} tokens of {ids.shape[0]} {source} sequences")

    def measure(self, dense: nn.Module, sparse: nn.Module, block_pattern: str | None, device) -> dict[str, float] | None:
        """Per-block alignment, or None when the model has no discoverable blocks (nothing to plot)."""
        from starfish.errors import StarfishError

        try:
            return block_alignment(dense, sparse, self.images, block_pattern, device=device)
        except StarfishError:
            return None
