"""A name -> object registry, used only where users pick an option by name in the space YAML."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    def register(self, name: str, *, description: str = "") -> Callable[[T], T]:
        """Decorator; registering the same name twice is a programming error, so it raises."""

        def decorate(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            self._descriptions[name] = description or (getattr(obj, "__doc__", "") or "").strip().split("\n")[0]
            return obj

        return decorate

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        return {name: self._descriptions[name] for name in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._entries
