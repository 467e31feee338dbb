"""Shared fixtures: the real CIFAR-10 material in ../shared, and small loaded models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
CIFAR = SHARED / "data" / "cifar10"
MODELS = SHARED / "models"
WEIGHTS = {
    "cifar10-vit": MODELS / "vit_cifar10_smmk47.pth",
    "cifar10-resnet20": MODELS / "resnet20_akamaster.th",
    "cifar10-resnet56": MODELS / "resnet56_akamaster.th",
}

if "OMP_NUM_THREADS" not in os.environ:  # an explicit thread count wins (on a busy machine 1 thread is far faster)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


SHARED_FIXTURES = {"shared", "calib_images", "eval_set", "pretrained"}
SHARED_NAMES = ("SHARED", "CIFAR", "WEIGHTS")  # module-level uses of the material
DISTRIBUTED_MODULES = {"test_distributed", "test_fsdp", "test_fsdp_cli"}  # process groups (gloo) of 2 ranks


def pytest_collection_modifyitems(config, items) -> None:
    """Markers from what a test uses, so they stay consistent: ``shared`` (reads ../shared),
    ``distributed`` (starts a process group); ``slow`` is set by hand on tests of more than ~1.5 s.
    ``pytest -m "not slow"`` is the fast tier; ``-m "not shared"`` runs where ../shared is absent."""
    sources: dict[str, str] = {}
    for item in items:
        path = Path(str(item.fspath))
        text = sources.setdefault(str(path), path.read_text(encoding="utf-8"))
        if SHARED_FIXTURES & set(item.fixturenames) or any(name in text for name in SHARED_NAMES):
            item.add_marker(pytest.mark.shared)
        if path.stem in DISTRIBUTED_MODULES:
            item.add_marker(pytest.mark.distributed)


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (CIFAR / "train").is_dir():
        pytest.fail(f"the shared CIFAR-10 material is missing at {SHARED}; set STARFISH_SHARED to its folder")
    return SHARED


@pytest.fixture(scope="session")
def calib_images(shared):
    """64 preprocessed calibration images per model spec (cached per session)."""
    from starfish.data.images import load_folder
    from starfish.models import create_model

    cache: dict[str, torch.Tensor] = {}

    def get(spec: str, n: int = 64, seed: int = 0) -> torch.Tensor:
        key = f"{spec}:{n}:{seed}"
        if key not in cache:
            pre = create_model(spec).preprocess
            data, _, _ = load_folder(CIFAR / "train", pre.transform(), n, seed, "calibration", balanced=False)
            cache[key] = data.tensors[0]
        return cache[key]

    return get


@pytest.fixture(scope="session")
def eval_set(shared):
    """A class-balanced labelled evaluation subset per model spec (cached per session)."""
    from starfish.data.images import load_folder
    from starfish.models import create_model

    cache: dict[str, object] = {}

    def get(spec: str, n: int = 500, seed: int = 0):
        key = f"{spec}:{n}:{seed}"
        if key not in cache:
            pre = create_model(spec).preprocess
            cache[key], _, _ = load_folder(CIFAR / "test", pre.transform(), n, seed, "eval", balanced=True)
        return cache[key]

    return get


@pytest.fixture()
def pretrained():
    """Build a built-in CIFAR network with its real pretrained weights."""
    from starfish.models import create_model

    def get(spec: str):
        return create_model(spec, WEIGHTS[spec])

    return get
