"""One string registry type for models, pruners, allocations, repairs and healers (timm style).

A registry maps names to entries, refuses an unknown name with a one-line error listing the
choices, and lists its names sorted. ``kind`` names the flag a user would change.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

from starfish.errors import StarfishError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, flag: str | None = None) -> None:
        self.kind = kind  # "pruner", "allocation", ...
        self.flag = flag or f"--{kind}"
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of ``add``."""

        def wrap(entry: T) -> T:
            return self.add(name, entry)

        return wrap

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise StarfishError(f"unknown {self.kind} '{name}'; choose one of {', '.join(self.names())} ({self.flag}).")
        return self._entries[name]

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __setitem__(self, name: str, entry: T) -> None:
        self.add(name, entry)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
