"""Image folders (with or without class sub-folders), seeded subsets, and datasets of dict items.

Calibration sets are drawn uniformly at random (labels are never looked at); evaluation subsets
are class-balanced so that a small --eval-size still measures every class. ``ImageFiles`` decodes
one image per access and yields a Batch item ``{"pixel_values", "labels"}``, so a DataLoader over
it streams dict batches (``starfish.data.loading``) and nothing needs the whole set decoded at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from starfish.nn.batch import LABELS, PIXELS, Batch
from starfish.errors import StarfishError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class ImageFolderIndex:
    """The files of an image folder; ``labels`` is None when there are no class sub-folders."""

    root: Path
    paths: list[Path]
    labels: list[int] | None
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def index_image_folder(root: str | Path, role: str = "image") -> ImageFolderIndex:
    """List an image folder. Class sub-folders (sorted by name) give labels 0..K-1."""
    root = Path(root)
    if not root.exists():
        raise StarfishError(f"{role} folder {root} does not exist; check the path.")
    if not root.is_dir():
        raise StarfishError(f"{role} folder {root} is not a directory; pass a folder of images.")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    for d in subdirs:
        files = _images_in(d)
        if files:
            labels += [len(classes)] * len(files)
            classes.append(d.name)
            paths += files
    loose = _images_in(root)
    empty = [d for d in subdirs if not _images_in(d)]
    if paths and empty:  # skipping it would shift every later class index by one
        raise StarfishError(
            f"class folder {empty[0]} of the {role} folder holds no images; class labels follow the sorted "
            "sub-folders, so remove the empty folder or put its images back."
        )
    if paths and loose:
        raise StarfishError(
            f"{role} folder {root} mixes images at its top level with class sub-folders; "
            "move the loose images into a class folder or into a folder of their own."
        )
    if not paths:
        if not loose:
            raise StarfishError(
                f"{role} folder {root} holds no images (looked for {', '.join(IMAGE_SUFFIXES)} "
                "at its top level and one level down); point it at a folder of images."
            )
        return ImageFolderIndex(root, loose, None, [])
    return ImageFolderIndex(root, paths, labels, classes)


def resolve_size(size: float | int | None, pool: int, role: str) -> int:
    """``None`` = all; an integer >= 1 = that many; a fraction in (0, 1) = that share of the pool."""
    role = {"calibration": "calib"}.get(role, role)  # name the CLI flag (--calib-size, --eval-size)
    if size is None:
        return pool
    if size <= 0:
        raise StarfishError(f"--{role}-size must be positive (a count, or a fraction in (0, 1)); got {size}.")
    n = int(math.ceil(size * pool)) if size < 1 else int(size)
    if size >= 1 and size != int(size):
        raise StarfishError(f"--{role}-size {size} is neither a whole count nor a fraction in (0, 1).")
    if n > pool:
        raise StarfishError(f"--{role}-size {n} is larger than the {pool} images available; ask for at most {pool}.")
    return n


def random_subset(pool: int, n: int, seed: int) -> list[int]:
    """n distinct indices drawn uniformly with a fixed seed (sorted, so file order is stable)."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(pool, size=n, replace=False).tolist())


def balanced_subset(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """n indices with classes as equal as possible (the first n % K classes get one more)."""
    if n == len(labels):
        return list(range(n))
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    classes = np.unique(labels_arr)
    per_class = {c: rng.permutation(np.flatnonzero(labels_arr == c)).tolist() for c in classes}
    quota = {c: n // len(classes) + (1 if i < n % len(classes) else 0) for i, c in enumerate(classes)}
    chosen: list[int] = []
    spill: list[int] = []
    for c in classes:
        chosen += per_class[c][: quota[c]]
        spill += per_class[c][quota[c]:]
    short = n - len(chosen)
    if short > 0:  # some class had fewer images than its quota: top up from the rest at random
        chosen += rng.permutation(spill)[:short].tolist()
    return sorted(chosen)


class ImageFiles(Dataset):
    """Decodes images on access; returns ``{"pixel_values": (C, H, W), "labels": int}`` (-1 = unlabeled)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | None, transform: Callable) -> None:
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as img:
                x = self.transform(img.convert(getattr(self.transform, "image_mode", "RGB")))  # "L" for 1-channel models
        except OSError as exc:
            raise StarfishError(f"cannot read image {self.paths[i]}: {exc}; remove or replace the file.") from None
        return {PIXELS: x, LABELS: self.labels[i] if self.labels is not None else -1}


def item_pair(item: object) -> tuple[torch.Tensor, object]:
    """(inputs, labels) of a dataset item or a collated batch, whether a dict or an (x, y) pair."""
    if isinstance(item, dict):
        return item[PIXELS], item.get(LABELS, -1)
    return item[0], item[1]  # type: ignore[index]


def as_image_batch(item: object) -> Batch:
    """A collated batch as a Batch mapping, whether the dataset yields dicts or (x, y) pairs."""
    if isinstance(item, dict):
        return {k: torch.as_tensor(v) for k, v in item.items()}
    x, y = item_pair(item)
    return {PIXELS: x, LABELS: torch.as_tensor(y).long()}


def materialize(dataset: Dataset, batch_size: int = 256, workers: int = 0, desc: str | None = None) -> TensorDataset:
    """Decode a whole (small) dataset once into memory; evaluation sets are streamed instead."""
    from tqdm.auto import tqdm

    xs, ys = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    for item in tqdm(loader, desc=desc, disable=desc is None, leave=False):
        batch = as_image_batch(item)
        xs.append(batch[PIXELS])
        ys.append(batch[LABELS])
    return TensorDataset(torch.cat(xs), torch.cat(ys).long())


def select_images(
    root: str | Path, transform: Callable, size: float | int | None, seed: int, role: str, balanced: bool
) -> tuple[ImageFiles, ImageFolderIndex, list[int]]:
    """Index a folder and take a seeded subset, without decoding anything."""
    index = index_image_folder(root, role)
    n = resolve_size(size, len(index), role)
    picks = balanced_subset(index.labels, n, seed) if balanced and index.labels else random_subset(len(index), n, seed)
    labels = [index.labels[i] for i in picks] if index.labels is not None else None
    return ImageFiles([index.paths[i] for i in picks], labels, transform), index, picks


def load_folder(
    root: str | Path,
    transform: Callable,
    size: float | int | None,
    seed: int,
    role: str,
    balanced: bool,
    in_memory: bool = True,
    progress: bool = True,
) -> tuple[Dataset, ImageFolderIndex, list[int]]:
    """Index a folder, take a seeded subset, and (optionally) decode it into memory (small sets only:
    the pipeline streams evaluation images through ``starfish.data.loading`` instead)."""
    files, index, picks = select_images(root, transform, size, seed, role, balanced)
    data: Dataset = materialize(files, desc=f"loading {role} images" if progress else None) if in_memory else files
    return data, index, picks


def images_only(dataset: Dataset) -> torch.Tensor:
    """All inputs of a (small) dataset stacked into one tensor."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0]
    return torch.stack([item_pair(dataset[i])[0] for i in range(len(dataset))])
