"""SIGTERM handled one way for the length of a block, and put back after it."""

from __future__ import annotations

import contextlib
import signal
from typing import Callable, Iterator, Union

Handler = Union[Callable[[int, object], None], int, signal.Handlers]


@contextlib.contextmanager
def sigterm_handled_by(handler: Handler) -> Iterator[None]:
    """Install ``handler`` for SIGTERM while the block runs (outside the main thread, where Python
    cannot install handlers, signals are left alone)."""
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
