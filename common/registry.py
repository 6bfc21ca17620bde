"""One registry mechanism for every plug-in point: sources, encoder backends, samplers, tasks.

A registry maps names to objects. Registering a name twice is an error (a plug-in can never
silently replace another), and asking for an unknown name lists the valid ones.
"""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mvld.common.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind (the kind names them in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name``; a second registration of a name is an error."""
        if name in self._entries:
            raise ConfigError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name lists the valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(self.names()) or "(none registered)"
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {valid}") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
