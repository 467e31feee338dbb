"""Checkpoints of a heal in progress, so an interrupted run continues instead of starting over.

A run with ``--out DIR`` writes its healing state into ``.DIR.resume/`` (layout in ``outputs``)
every ``--checkpoint-every`` optimizer steps, or by wall time with ``auto`` (the default: every
few minutes, never more than a small share of the run), and always after the last step, so a kill
during the final evaluation or while writing loses no healing. ``starfish run ... --resume``
continues from it and ends with the same weights as an uninterrupted run: bit-identical on the
CPU with the same seed, because everything the remaining steps depend on is restored. (A CPU
reduction split over another number of threads sums in another order, so the torch version and
thread count are recorded too, and resuming under others is warned about, not refused.)

What one checkpoint holds (one file per training scope: ``joint.pt``, or ``block-NNN.pt`` per
block of block-wise healing, so completed blocks are kept and the block in progress continues at
its step): the trained module's whole state dict (masked weights, frozen ones, BatchNorm
statistics and counters), its masks, the optimizer state, the batch-order generator's state, the
global torch RNG (dropout), the step, the loss and learning-rate histories and the divergence
guard (smoothed loss, best, the kept snapshot). The position within the epoch follows from the
step; the generator is brought to the start of that epoch by replaying the run's shuffles from
its seed, and checked against the saved state.

What a resume recomputes instead of storing: everything before healing (data selection, pruning,
repair, cached dense targets). Those steps are deterministic, so recomputing is exact and keeps
the pipeline unchanged; the checkpoint's masks and calibration digest are compared with the
recomputed ones, so a run whose inputs changed is refused instead of silently mixing two runs.

Every checkpoint file has its sha256 recorded beside it (``NAME.pt.sha256``) when written, and
``--resume`` verifies every one before any work: a flipped bit is refused naming the file, never
loaded (``verify_checkpoint``).

``run.json`` beside the checkpoints holds the run's fingerprint: its saved config (without where
it writes, how often it checkpoints and progress / loader settings, which change no weight) and
the calibration digest. ``--resume`` with a different config is refused naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from starfish.nn.batch import batch_digest
from starfish.distributed.context import is_writer
from starfish.errors import StarfishError
from starfish.models.registry import sha256_of
from starfish.masks import Masks
from starfish.common.outputs import RESUME_MARKER, discard_resume, resume_dir

AUTO = "auto"
AUTO_SECONDS = 300.0  # auto: a checkpoint once five minutes have passed since the last one (or the start)...
AUTO_SAVE_SHARE = 0.05  # ...and less often when writing one would take more than this share of the time
FORMAT = 2  # 2: every NAME.pt has a NAME.pt.sha256 beside it
# Settings that change no healed weight: a resume may differ in them.
UNFINGERPRINTED = ("heal.progress", "workers", "eval_batch_size")


def check_every(value: object) -> int | str:
    """``--checkpoint-every``: ``auto``, 0 (off) or a positive number of optimizer steps."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StarfishError(f"--checkpoint-every must be 'auto', 0 (off) or a number of steps; got {value!r}.")
    return value


def fingerprint(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A run's saved config as flat ``section.key`` entries (JSON values), minus what changes no weight."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value

    walk("", json.loads(json.dumps(dict(saved), default=str)))
    return {k: v for k, v in flat.items() if k not in UNFINGERPRINTED}


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}={saved.get(k)!r} there, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]


def _read_run(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "run.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StarfishError(
            f"the checkpoint record {folder / 'run.json'} is unreadable ({exc}); pass --force without --resume to start over."
        ) from None


def check_resume(config: Any) -> None:
    """Part of ``validate`` (with the output lock held): ``--resume`` needs ``--out``; a checkpoint
    left by an interrupted run is neither resumed with other settings nor silently thrown away."""
    check_every(config.checkpoint_every)
    if config.out is None:
        if config.resume:
            raise StarfishError("--resume continues the checkpoint kept beside an output; pass the --out of the interrupted run.")
        return
    folder = resume_dir(config.out)
    saved = _read_run(folder)
    if saved is None:
        return
    if not config.resume and not config.force:
        raise StarfishError(
            f"{folder} holds the checkpoint of an interrupted heal toward {config.out}; pass --resume to continue it, "
            "or --force to discard it and start over."
        )
    if config.resume:
        for path in sorted(folder.glob("*.pt")):
            verify_checkpoint(path)
        diff = _differences(saved.get("config", {}), fingerprint(config.saved_dict()))
        if diff:
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            raise StarfishError(
                f"--resume: the checkpoint in {folder} was written with other settings: {'; '.join(diff[:3])}{more}; "
                "rerun with the same settings, or drop --resume and pass --force to start over."
            )


class Checkpointer:
    """The resume folder of one run: writes checkpoints as healing goes, restores them on ``--resume``.

    ``scope(key)`` hands ``train_steps`` the ``ResumePoint`` of one training run (``joint`` or a block).
    """

    def __init__(self, folder: Path, every: int | str, record: dict, environment: dict | None = None) -> None:
        self.folder = folder
        self.every = check_every(every)
        self.record = record  # run.json: the fingerprint checkpoints are tied to
        self.tag = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        self.environment = environment or {}  # torch version and CPU threads: a change can move the last bits
        self.resumed: dict[str, int] = {}  # scope -> the step it continued from
        self.kept: tuple[str, int, int] | None = None  # (scope, step, total) of the newest checkpoint on disk
        self._save_seconds = 0.0
        self._last_save = time.monotonic()

    @classmethod
    def open(cls, config: Any, calibration: Mapping[str, torch.Tensor] | None) -> "Checkpointer | None":
        """The run's checkpointer (None without ``--out``, or with checkpoints off and nothing to resume).

        ``--resume`` with no checkpoint starts from the beginning with a note, so the same command
        line can be reissued after any interruption (a scheduler restarting preempted jobs).
        """
        if config.out is None:
            return None
        folder = resume_dir(config.out)
        record = {"format": FORMAT, "config": fingerprint(config.saved_dict()), "calibration": batch_digest(calibration)}
        environment = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        found = _read_run(folder)
        saved = found if config.resume else None
        if saved is not None and saved.get("calibration") != record["calibration"]:
            raise StarfishError(
                f"--resume: the calibration data differ from the checkpoint's in {folder} (the files changed); "
                "restore them, or drop --resume and pass --force to start over."
            )
        if saved is None:  # a fresh start: nothing of an earlier run may be mixed in
            if is_writer():  # under torchrun only rank 0 touches the folder
                discard_resume(config.out)
            if config.resume:
                sys.stderr.write(f"starfish: note: no checkpoint in {folder}; --resume starts from the beginning.\n")
            elif found is not None:
                sys.stderr.write(f"starfish: note: --force discarded the healing checkpoint in {folder}.\n")
        else:
            if saved.get("environment", environment) != environment:  # same results, maybe not the same last bits
                sys.stderr.write(
                    f"starfish: warning: resuming under {environment} where the checkpoint was written under "
                    f"{saved['environment']}; the result may differ from an uninterrupted run in the last bits.\n"
                )
            for stale in folder.glob("*.tmp-*"):  # half-written by a killed process; the previous file is intact
                stale.unlink()
        if config.checkpoint_every == 0 and saved is None:
            return None
        return cls(folder, config.checkpoint_every, record, environment)

    def scope(self, key: str) -> "ResumePoint":
        return ResumePoint(self, key)

    def due(self, step: int, total: int) -> bool:
        if step >= total:
            return self.every != 0
        if self.every == AUTO:
            interval = max(AUTO_SECONDS, self._save_seconds / AUTO_SAVE_SHARE)
            return time.monotonic() - self._last_save >= interval
        return self.every != 0 and step % self.every == 0

    def write(self, key: str, state: dict, step: int, total: int) -> None:
        """Atomically: a kill mid-write leaves the previous checkpoint valid. Under torchrun rank 0
        writes (data-parallel ranks hold the same state); every rank reads it back on --resume."""
        if not is_writer():
            return
        started = time.monotonic()
        if not (self.folder / "run.json").is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / RESUME_MARKER).write_text("Healing checkpoints written by starfish for `--resume`.\n")
            run = {**self.record, "environment": self.environment}
            _write_atomic(self.folder / "run.json", lambda f: f.write(json.dumps(run, indent=1).encode()))
        _write_checkpoint(self.folder / f"{key}.pt", state)
        self.kept = (key, step, total)  # before the folder sync: an interrupt there still names it
        _sync_folder(self.folder)
        self._last_save = time.monotonic()
        self._save_seconds = self._last_save - started

    def read(self, key: str) -> dict | None:
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        verify_checkpoint(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: never half-restore
            raise StarfishError(f"the checkpoint {path} is unreadable ({exc}); pass --force without --resume to start over.") from None
        if state.get("tag") != self.tag:
            raise StarfishError(f"the checkpoint {path} belongs to another run than {self.folder / 'run.json'}; pass --force without --resume to start over.")
        return state

    def note_interrupted(self) -> None:
        """One line on stderr after an interrupt: what is kept and how to continue."""
        if self.kept is not None:
            key, step, total = self.kept
            sys.stderr.write(
                f"starfish: note: the healing checkpoint ({key}, step {step} of {total}) is kept in {self.folder}; "
                "rerun the same command with --resume to continue.\n"
            )


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_checkpoint(path: Path, state: dict) -> None:
    """``path`` and its digest file ``NAME.pt.sha256``. The digest file names the new file's sha256
    and the previous one's, and is replaced before the checkpoint, so whichever of the two a kill
    leaves in place is listed, while a changed byte in either is caught by ``verify_checkpoint``."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        previous = sha256_of(path) if path.is_file() else None
        digests = [sha256_of(tmp), *([previous] if previous else [])]
        _write_atomic(_digest_path(path), lambda f: f.write(("\n".join(digests) + "\n").encode()))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def verify_checkpoint(path: Path) -> None:
    """Refuse a checkpoint whose bytes are not those starfish wrote (a flipped bit, a truncated copy)."""
    try:
        recorded = _digest_path(path).read_text().split()
    except (OSError, UnicodeDecodeError):
        recorded = []
    if sha256_of(path) not in recorded:
        raise StarfishError(
            f"the checkpoint {path} does not match the sha256 recorded when it was written (corrupted or changed); "
            "pass --force without --resume to start over."
        )


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sync_folder(folder: Path) -> None:
    """Make the renames into ``folder`` survive a lost machine, not only a killed process."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResumePoint:
    """One ``train_steps`` run's side of a checkpoint: ``bind`` restores, ``step_done`` saves when due."""

    def __init__(self, owner: Checkpointer, key: str) -> None:
        self.owner = owner
        self.key = key

    def bind(
        self,
        module: nn.Module,
        masks: Masks,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        guard: Any,  # heal.training.DivergenceGuard (not imported: heal.training imports this module's types)
        outcome: Any,  # heal.training.StepsOutcome
        n: int,
        batch_size: int,
        total: int,
        monitor: Any = None,
    ) -> None:
        """Remember what a checkpoint holds; restore it when one was saved for this scope.
        ``monitor``: the held-out stopping rule of budget auto (``heal.stopping``), saved alongside.

        ``generator`` must be freshly seeded: it is brought to the start of the checkpoint's epoch.
        """
        self.module, self.masks, self.optimizer, self.generator = module, masks, optimizer, generator
        self.guard, self.outcome, self.n, self.batch_size, self.total = guard, outcome, n, batch_size, total
        self.monitor = monitor
        state = self.owner.read(self.key)
        if state is not None:
            self._restore(state)

    def _restore(self, state: dict) -> None:
        path = self.owner.folder / f"{self.key}.pt"
        if (state["n"], state["batch_size"], state["total"]) != (self.n, self.batch_size, self.total):
            raise StarfishError(f"the checkpoint {path} was written for another calibration size or step budget; pass --force without --resume to start over.")
        saved_masks = state["masks"]
        if set(saved_masks) != set(self.masks.names()) or any(not torch.equal(saved_masks[k], self.masks[k].cpu()) for k in saved_masks):
            raise StarfishError(
                f"the pruning masks differ from those in the checkpoint {path} (pruning did not repeat exactly); "
                "pass --force without --resume to start over."
            )
        step = state["step"]
        per_epoch = math.ceil(self.n / self.batch_size)
        for _ in range(step // per_epoch):  # replay the shuffles of the finished epochs
            torch.randperm(self.n, generator=self.generator)
        probe = torch.Generator().set_state(self.generator.get_state())
        if step % per_epoch:
            torch.randperm(self.n, generator=probe)
        if not torch.equal(probe.get_state(), state["generator"]):
            raise StarfishError(f"the batch order of the checkpoint {path} cannot be reproduced here (another torch version?); pass --force without --resume to start over.")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        guard = state["guard"]
        for name in ("start", "smoothed", "best", "snapshot_step", "snapshot_loss"):
            setattr(self.guard, name, guard[name])
        snapshot = guard["snapshot"]
        self.guard.weights.copy = {k: v.to(self.guard.weights.store) for k, v in snapshot.items()} if snapshot is not None else None
        if (state.get("monitor") is None) != (self.monitor is None):
            raise StarfishError(f"the checkpoint {path} was written under another healing budget (auto / fixed); pass --force without --resume to start over.")
        if self.monitor is not None:
            self.monitor.load_state_dict(state["monitor"])
        self.outcome.steps = step
        self.outcome.losses[:] = state["losses"]
        self.outcome.lrs[:] = state["lrs"]
        self.owner.resumed[self.key] = step
        self.owner.kept = (self.key, step, self.total)

    def step_done(self) -> None:
        """After an optimizer step (and the mask re-applied): write a checkpoint when one is due."""
        step = self.outcome.steps
        if not self.owner.due(step, self.total):
            return
        guard = self.guard
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        state = {
            "format": FORMAT,
            "tag": self.owner.tag,
            "step": step,
            "n": self.n,
            "batch_size": self.batch_size,
            "total": self.total,
            "model": self.module.state_dict(),
            "masks": {k: v.cpu() for k, v in self.masks.items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": cuda,
            "losses": list(self.outcome.losses),
            "lrs": list(self.outcome.lrs),
            "guard": {
                "start": guard.start, "smoothed": guard.smoothed, "best": guard.best,
                "snapshot": guard.weights.copy, "snapshot_step": guard.snapshot_step, "snapshot_loss": guard.snapshot_loss,
            },
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
        }
        self.owner.write(self.key, state, step, self.total)
