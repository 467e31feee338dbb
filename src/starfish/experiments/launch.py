"""``--distributed ddp|fsdp``: validate, join the group, run, and fail every rank fast.

Order of work on every rank: check torchrun's environment and the device (``plan_context``), run
the job's ONE validation (every rank checks the output; only rank 0 takes its lock: it alone writes), and only then join
the process group, so every user error is reported before any collective exists. Inside the run,
an error on one rank ends that rank with one line and a non-zero exit; torchrun then stops the
other ranks (SIGTERM, which starfish turns into an orderly exit), and a rank already waiting in a
gloo collective sees its peer's connection close and fails at once (NCCL: the group's timeout).
"""

from __future__ import annotations

import contextlib
import signal
from contextlib import contextmanager
from typing import Iterator

from starfish.distributed.context import DistributedContext, activate, plan_context, start, stop
from starfish.errors import StarfishError
from starfish.common.signals import sigterm_handled_by


class RankFailure(Exception):
    """An unexpected error on one rank of a distributed run, as one line naming the rank."""


@contextmanager
def launched(mode: str | None, config, job: str = "run") -> Iterator[DistributedContext | None]:
    """Run the block as one rank of a ``torchrun`` launch (``mode`` None: as the only process).
    ``job``: the command (``run``, ``compare``), for what only some commands support."""
    if mode is None:
        yield None
        return
    from starfish.experiments.run_config import validate

    context = plan_context(mode, config.heal.device)
    if mode == "fsdp":
        from starfish.distributed.sharding import check_fsdp_run

        check_fsdp_run(config, job)
    activate(context)  # known before any group exists: validation asks whether this rank writes
    try:
        validate(config)  # on every rank, so a bad --out is refused by each rank itself
        # A rank that writes nothing, waiting in the rendezvous (C++, where Python's SIGTERM handler cannot
        # run), ends at once on torchrun's SIGTERM: rank 0 may have refused the run for a reason only it
        # sees (another process holds the output lock), and the others then stop within a second.
        with sigterm_handled_by(signal.SIG_DFL) if not context.is_writer else contextlib.nullcontext():
            start(context)
        try:
            yield context
        except (StarfishError, KeyboardInterrupt):
            raise
        except Exception as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RankFailure(f"rank {context.rank} of {context.world_size}: {type(exc).__name__}: {text}") from exc
    finally:
        stop()
