"""A name -> entry mapping with errors that list the known names (one registry per kind of part)."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from ganlib.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Holds named entries of one kind (networks, datasets, losses, strategies, extractors)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """Add `entry` under `name`; usable as a decorator when `entry` is omitted."""
        if entry is None:
            return lambda e: self.register(name, e)
        if name in self._entries:
            raise RuntimeError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """Look `name` up; an unknown name is a UserError listing the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise UserError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
