"""Hooks on named modules, removed however the block ends; forward passes a hook may end early.

Every place that watches a network (block discovery, calibration statistics, stream capture, the
memory probe) registers hooks for the length of a block and ends some passes as soon as it has
what it needs (``StopForward``, raised from a hook). These two helpers are that pattern, written once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch.utils.hooks import RemovableHandle

T = TypeVar("T")


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the needed activation has been seen."""


@contextmanager
def hooks(handles: list[RemovableHandle] | RemovableHandle) -> Iterator[None]:
    """Remove ``handles`` (one handle, or a list that may still grow inside the block) on exit."""
    try:
        yield
    finally:
        for handle in handles if isinstance(handles, list) else [handles]:
            handle.remove()


def forward_until(run: Callable[[], T]) -> T | None:
    """``run()`` (a forward pass), or None when a hook ended it early with ``StopForward``."""
    try:
        return run()
    except StopForward:
        return None
