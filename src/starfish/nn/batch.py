"""Batches as mappings, and the one place where a model is called on one.

Every stage of starfish (pruning statistics, repairs, healing, evaluation) moves data as a
``Batch``: a plain ``dict`` of tensors whose first dimension is the sample axis.

* images: ``{"pixel_values": (N, C, H, W)}`` plus ``"labels": (N,)`` where known (-1 = unknown);
* text:   ``{"input_ids": (N, L), "attention_mask": (N, L)}``; ``attention_mask`` doubles as the
  per-position weight mask that every loss and statistic honours (padding never counts).

A *calibration set* is one such mapping holding all samples (small by design), so healing can
shuffle samples and slice batches without knowing the modality. ``call_model`` is the only code
that turns a batch into a forward call; hooks on named modules observe everything else.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn

Batch = dict[str, torch.Tensor]

PIXELS = "pixel_values"
TOKENS = "input_ids"
ATTENTION = "attention_mask"
LABELS = "labels"
MODEL_INPUTS = (PIXELS, TOKENS, ATTENTION)  # keys a model consumes; everything else is metadata


def as_batch(data: torch.Tensor | Mapping[str, torch.Tensor]) -> Batch:
    """A mapping stays as it is; a bare tensor is taken as images (the pre-mapping API)."""
    if isinstance(data, torch.Tensor):
        return {PIXELS: data}
    return dict(data)


def calibration_set(data: object) -> Batch:
    """One mapping of stacked tensors from what callers hold: a mapping, a bare image tensor, a
    ``TensorDataset`` (images, labels) or any dataset of ``(x, y)`` pairs or dict items."""
    from torch.utils.data import Dataset, TensorDataset

    if isinstance(data, (torch.Tensor, Mapping)):
        return as_batch(data)
    if isinstance(data, TensorDataset):
        out = {PIXELS: data.tensors[0]}
        if len(data.tensors) > 1:
            out[LABELS] = data.tensors[1].long()
        return out
    if isinstance(data, Dataset):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        if items and isinstance(items[0], Mapping):
            return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
        return {PIXELS: torch.stack([it[0] for it in items]), LABELS: torch.as_tensor([int(it[1]) for it in items])}
    raise TypeError(f"cannot use {type(data).__name__} as calibration data; pass a tensor, a mapping or a dataset")


def batch_len(batch: Mapping[str, torch.Tensor]) -> int:
    """Number of samples (the first dimension shared by every tensor of the batch)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 0


def select(batch: Mapping[str, torch.Tensor], index: torch.Tensor | slice) -> Batch:
    """The samples ``index`` of every tensor (a slice keeps views; an index tensor copies)."""
    return {k: v[index] for k, v in batch.items()}


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str, non_blocking: bool = False) -> Batch:
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def iter_batches(data: torch.Tensor | Mapping[str, torch.Tensor], batch_size: int) -> Iterator[Batch]:
    """Consecutive batches of at most ``batch_size`` samples from a calibration set."""
    full = as_batch(data)
    n = batch_len(full)
    for i in range(0, n, batch_size):
        yield select(full, slice(i, i + batch_size))


def concat(batches: list[Mapping[str, torch.Tensor]]) -> Batch:
    """One mapping from many batches with the same keys (sample axis concatenated)."""
    if not batches:
        return {}
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def model_inputs(batch: Mapping[str, torch.Tensor]) -> Batch:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def call_model(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> object:
    """Run ``model`` on a batch: images positionally (torchvision/timm/user modules), text by keyword
    with the KV cache off (Hugging Face causal LMs)."""
    if PIXELS in batch:
        return model(batch[PIXELS])
    if TOKENS in batch:
        kwargs = {TOKENS: batch[TOKENS]}
        if ATTENTION in batch:
            kwargs[ATTENTION] = batch[ATTENTION]
        return model(**kwargs, use_cache=False)
    raise KeyError(f"a batch needs '{PIXELS}' or '{TOKENS}'; got keys {sorted(batch)}")


def position_weights(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """(N, L) float weights of the token positions that count (padding = 0), or None for images."""
    mask = batch.get(ATTENTION)
    return None if mask is None else mask.float()


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def batch_digest(batch: Mapping[str, torch.Tensor] | None) -> str | None:
    """sha256 over a batch mapping's tensors (names, dtypes, shapes, bytes): which data exactly."""
    import hashlib

    if batch is None:
        return None
    digest = hashlib.sha256()
    for key in sorted(batch):
        t = batch[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
