"""Output directories that appear whole or not at all, and never replace an input."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from starfish.errors import StarfishError


def check_output_dir(path: str | Path, force: bool, inputs: tuple[str | Path | None, ...] = ()) -> Path:
    """Refuse an existing output (unless forced) and any output that is, or holds, an input."""
    path = Path(path).resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).resolve()
        if src == path or path in src.parents:
            raise StarfishError(f"output directory {path} would overwrite the input {item}; choose another --out.")
    if path.exists():
        if not path.is_dir():
            raise StarfishError(f"output path {path} exists and is a file; choose another --out.")
        if not force:
            raise StarfishError(f"output directory {path} already exists; pass --force to replace it or choose another --out.")
    return path


@contextmanager
def atomic_output_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a scratch folder beside ``path``; it becomes ``path`` only if the block succeeds."""
    path = Path(path).resolve()
    check_output_dir(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
    scratch.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def save_weights(model: nn.Module, path: Path) -> None:
    """Dense tensors (zeros included) under the model's own state-dict keys."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "producer": "starfish"})


def load_healed(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``model.safetensors`` from a starfish output into a freshly built model (strict)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
    return model
