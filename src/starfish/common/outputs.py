"""Output directories that appear whole or not at all, never replace an input, and never race.

Layout beside an output ``DIR`` (all hidden, all named after it):
  * ``DIR/.starfish-output``  marker: only a folder holding it may be replaced with ``--force``;
  * ``.DIR.lock``             an flock held from validation until the output is written, so a second
                              run on the same ``--out`` fails fast instead of losing a result;
  * ``.DIR.partial-PID``      the folder being written; renamed to ``DIR`` when complete;
  * ``.DIR.old-PID``          the previous results while ``--force`` swaps the new ones in;
  * ``.DIR.resume/``          healing checkpoints (``heal.resume``) that ``--resume`` continues
                              from; it outlives kills on purpose and is removed (only the files
                              starfish wrote there) once ``DIR`` is complete.
Scratch left by a killed process is cleaned (or, for ``.old-PID`` with ``DIR`` missing, restored)
by the next run that takes the lock: holding it proves no live process is writing there. The
resume folder is not scratch: it is the work a killed run leaves for the next one.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from starfish.errors import StarfishError

MARKER = ".starfish-output"
_MARKER_TEXT = "This folder was written by starfish; `--force` may replace it.\n"
_HELD_LOCKS: dict[Path, int] = {}  # resolved output path -> fd of its lock file, held by this process
_MADE_PARENTS: dict[Path, list[Path]] = {}  # folders created to hold a lock file, removed again if left empty
_PROTECTED: list[Path] = []  # inputs of the current command that no RunConfig field names (e.g. --config)


def protect_inputs(*paths: str | Path | None) -> None:
    """Treat these paths as inputs of every output this process claims (``None`` entries ignored);
    ``protect_inputs()`` with no argument forgets them again."""
    if not paths:
        _PROTECTED.clear()
    _PROTECTED.extend(Path(p) for p in paths if p is not None and str(p).strip())


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _refuse_dangerous(path: Path, raw: str | Path) -> None:
    """Never let a replacement reach the filesystem root, the home folder or the working folder."""
    if str(raw).strip() == "":
        raise StarfishError("--out is empty; pass the folder to write, e.g. --out runs/r20.")
    cwd = Path.cwd().resolve()
    if path == Path(path.anchor) or path == Path.home().resolve():
        raise StarfishError(f"output directory {path} is the filesystem root or your home folder; choose a dedicated folder for --out.")
    if path == cwd or path in cwd.parents:
        raise StarfishError(f"output directory {path} is the current folder or one of its parents; choose a new sub-folder for --out.")


def _refuse_inputs(path: Path, inputs: tuple[str | Path | None, ...]) -> None:
    """The output may not be an input, hold an input, or sit inside an input folder."""
    for item in inputs:
        if item is None or str(item).strip() == "":
            continue
        src = Path(item).resolve()
        if src == path or path in src.parents:
            raise StarfishError(f"output directory {path} would overwrite the input {item}; choose another --out.")
        if src.is_dir() and src in path.parents:
            raise StarfishError(f"output directory {path} lies inside the input folder {item}; choose an --out outside it.")


def _check_parent_writable(path: Path) -> None:
    """The nearest existing ancestor must be a folder we can create entries in (probed, so root's
    bypass of permission bits and read-only mounts give the true answer)."""
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise StarfishError(f"cannot create {path}: {ancestor} is a file, not a folder; choose another --out.")
    try:
        probe = tempfile.mkdtemp(prefix=".starfish-probe-", dir=ancestor)
        os.rmdir(probe)
    except OSError as exc:
        raise StarfishError(f"cannot write the output {path}: {ancestor} is not writable ({exc.strerror}); choose another --out.") from None


def _acquire_lock(path: Path) -> None:
    """Take (or re-enter) this process's exclusive lock on ``path``; fail fast when another holds it."""
    if path in _HELD_LOCKS:
        return
    lock = _lock_path(path)
    missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    _MADE_PARENTS[path] = missing  # deepest first
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StarfishError(
                f"another starfish process (pid {owner}) is writing {path}; wait for it to finish or choose another --out."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not unlinked by a releasing holder meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD_LOCKS[path] = fd


def release_output_lock(path: str | Path) -> None:
    """Drop this process's lock on an output (and its lock file); a no-op when not held."""
    path = Path(path).resolve()
    fd = _HELD_LOCKS.pop(path, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(_lock_path(path))
    os.close(fd)
    for folder in _MADE_PARENTS.pop(path, []):  # a refused run leaves no empty folders behind
        with contextlib.suppress(OSError):
            folder.rmdir()


def release_all_output_locks() -> None:
    for path in list(_HELD_LOCKS):
        release_output_lock(path)


atexit.register(release_all_output_locks)


def resume_dir(path: str | Path) -> Path:
    """Where the healing checkpoints of the output ``path`` live (see the layout above)."""
    path = Path(path).resolve()
    return path.parent / f".{path.name}.resume"


RESUME_MARKER = ".starfish-resume"  # only a resume folder holding it is ever emptied by starfish
_RESUME_FILES = re.compile(r"^(\.starfish-resume|run\.json|[A-Za-z0-9_-]+\.pt(\.sha256)?)(\.tmp-\d+)?$")


def discard_resume(path: str | Path) -> bool:
    """Delete the checkpoints of output ``path``: the files starfish names there, then the folder if
    that left it empty. A folder without the marker is not ours and stays. True when one was removed."""
    folder = resume_dir(path)
    if not (folder / RESUME_MARKER).is_file():
        return False
    with contextlib.suppress(FileNotFoundError):
        (folder / "run.json").unlink()  # first: a half-emptied folder holds no checkpoint to resume
    for item in folder.iterdir():
        if item.is_file() and not item.is_symlink() and _RESUME_FILES.match(item.name) and item.name != RESUME_MARKER:
            item.unlink()
    (folder / RESUME_MARKER).unlink()  # last: a folder interrupted while emptying is still recognised
    with contextlib.suppress(OSError):
        folder.rmdir()
    return True


def _recover_scratch(path: Path) -> None:
    """Under the lock: restore results a killed ``--force`` had set aside, delete every other scratch."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(partial|old)-\d+$")
    leftovers = sorted(p for p in path.parent.iterdir() if pattern.match(p.name)) if path.parent.is_dir() else []
    for item in leftovers:
        if item.name.startswith(f".{path.name}.old-") and not path.exists():
            item.rename(path)  # killed between moving the old results aside and moving the new ones in
        else:
            shutil.rmtree(item, ignore_errors=True)


def check_output_dir(path: str | Path, force: bool, inputs: tuple[str | Path | None, ...] = (), claim: bool = True) -> Path:
    """Claim ``path`` as this run's output before any heavy work: refuse dangerous locations, inputs,
    unwritable parents, an existing folder (unless ``force`` and starfish wrote it), then hold the
    lock until ``atomic_output_dir`` finishes (or ``release_output_lock``). ``claim=False`` (the
    ranks of a torchrun launch that do not write) makes the same checks without taking the lock,
    so every rank refuses a bad ``--out`` itself instead of waiting for a peer that already left."""
    raw = path
    _refuse_dangerous(Path(path).resolve(), raw)
    path = Path(path).resolve()
    _refuse_inputs(path, (*inputs, *_PROTECTED))
    if path.exists() and not path.is_dir():
        raise StarfishError(f"output path {path} exists and is a file; choose another --out.")
    _check_parent_writable(path)
    if not claim:
        _refuse_existing(path, force)
        return path
    held_before = path in _HELD_LOCKS
    _acquire_lock(path)
    try:
        _recover_scratch(path)
        _refuse_existing(path, force)
    except BaseException:
        if not held_before:
            release_output_lock(path)
        raise
    return path


def _refuse_existing(path: Path, force: bool) -> None:
    """An existing output is replaced only with ``force``, and only when starfish wrote it."""
    if path.exists():
        if not force:
            raise StarfishError(f"output directory {path} already exists; pass --force to replace it or choose another --out.")
        if not (path / MARKER).is_file():
            raise StarfishError(
                f"output directory {path} was not written by starfish (no {MARKER} marker), so --force will not "
                "replace it; delete it yourself or choose another --out."
            )


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the two renames that swap an output in (SIGKILL is recovered later)."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def atomic_output_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a scratch folder beside ``path``; it becomes ``path`` only if the block succeeds.

    The previous results (``force``) stay in place until the new ones are complete, and are
    restored by the next run if this process dies between the two renames.
    """
    path = check_output_dir(path, force)
    try:
        scratch = path.parent / f".{path.name}.partial-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            (scratch / MARKER).write_text(_MARKER_TEXT)
            yield scratch
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        apply_umask(scratch)
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        with _signals_deferred():
            if path.exists():
                path.rename(old)
            scratch.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        discard_resume(path)  # the output is complete: checkpoints toward it are obsolete (still under the lock)
    finally:
        release_output_lock(path)


def apply_umask(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions the user's umask asks
    for: some writers (safetensors) create files 0600 whatever the umask, so outputs would otherwise
    differ in who may read them."""
    mask = os.umask(0)
    os.umask(mask)
    for item in (path, *(path.rglob("*") if path.is_dir() else ())):
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with a byte-reproducible header.

    safetensors serialises its metadata from a hash map, so the same tensors give files whose
    sha256 differs from run to run; the header is rewritten here with its keys sorted.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        fixed = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(fixed) <= size:  # always, for a header serde wrote compactly: patch it in place
            f.seek(8)
            f.write(fixed + b" " * (size - len(fixed)))
            return
        fixed += b" " * (-len(fixed) % 8)
        tmp = Path(str(path) + ".tmp")
        with open(tmp, "wb") as out:
            out.write(len(fixed).to_bytes(8, "little") + fixed)
            shutil.copyfileobj(f, out, 1 << 24)
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: Path) -> None:
    """Dense tensors (zeros included) under the model's own state-dict keys."""
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    write_safetensors(state, path, {"format": "pt", "producer": "starfish"})


def load_healed(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``model.safetensors`` from a starfish output into a freshly built model (strict)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
    return model
