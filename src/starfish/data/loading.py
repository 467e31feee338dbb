"""Data loaders for the pipeline: the calibration set decoded once (within a budget), evaluation streamed.

Calibration is small by design and every stage shuffles and slices it, so it is decoded into one
Batch mapping, but only after estimating its size: a set that would not fit ``--calib-max-gb`` is
refused before anything is decoded. Evaluation images are never held together: each pass reads
them through a DataLoader (worker processes, pinned memory when the model runs on an accelerator),
so peak memory does not grow with --eval-size.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from starfish.nn.batch import Batch, concat
from starfish.data.images import as_image_batch
from starfish.errors import StarfishError

GB = 1024**3


def sample_bytes(item: object) -> int:
    """Bytes one decoded sample occupies once stacked (every tensor or number of the item)."""
    batch = as_image_batch(item)
    return sum(v.numel() * v.element_size() for v in batch.values())


def estimate_bytes(dataset: Dataset) -> int:
    """The decoded size of the whole dataset, from decoding its first sample only."""
    n = len(dataset)  # type: ignore[arg-type]
    return 0 if n == 0 else n * sample_bytes(dataset[0])


def check_budget(dataset: Dataset, max_gb: float, flag: str = "--calib-max-gb", what: str = "calibration set") -> int:
    """Refuse, before decoding it, a set whose decoded size exceeds ``max_gb``; returns the estimate."""
    need = estimate_bytes(dataset)
    if need > max_gb * GB:
        raise StarfishError(
            f"the {what} would take {need / GB:.2f} GB decoded ({len(dataset)} samples), over the {max_gb:g} GB "  # type: ignore[arg-type]
            f"budget; lower --calib-size or raise {flag}."
        )
    return need


def loader(
    dataset: Dataset, batch_size: int, workers: int = 0, device: torch.device | str | None = None
) -> DataLoader:
    """A sequential DataLoader of dict batches; pinned memory when the consumer is an accelerator."""
    pin = device is not None and torch.device(device).type != "cpu" and torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,
    )


def stream(dataset: Dataset, batch_size: int, workers: int = 0, device: torch.device | str | None = None) -> Iterator[Batch]:
    """Batches of ``dataset`` as mappings, whatever its items look like (dicts or (x, y) pairs)."""
    for item in loader(dataset, batch_size, workers, device):
        yield as_image_batch(item)


def decode_calibration(
    dataset: Dataset,
    max_gb: float,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
) -> Batch:
    """The whole calibration set as ONE mapping of stacked tensors, refused above ``max_gb``."""
    from tqdm.auto import tqdm

    check_budget(dataset, max_gb)
    batches = list(tqdm(stream(dataset, batch_size, workers), desc="loading calibration images", disable=not progress, leave=False))
    return concat(batches)
