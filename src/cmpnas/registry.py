"""The one registry type: a name -> object mapping with a ``register`` that also works as a decorator.

Backbones, backbone families, search spaces, compatibility terms, benchmark protocols, rewards, latency runtimes
and data sources are each one of these, so adding one is one module plus one ``register`` line. It is a plain
``dict`` underneath: lookups, ``in`` and iteration stay what they were, and each caller keeps its own error for
an unknown name (the fix it names differs per registry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


class Registry(dict[str, T]):
    """``REG.register("name", obj)`` adds ``obj``; ``@REG.register("name")`` adds the decorated object."""

    def __init__(self, kind: str, entries: dict[str, T] | None = None) -> None:
        super().__init__(entries or {})
        self.kind = kind

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: Any = None) -> Any:
        if obj is not None:
            self[name] = obj
            return obj

        def decorate(item: T) -> T:
            self[name] = item
            return item

        return decorate

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self)})"
