"""Name -> builder registries (models, losses, transforms).

Configs name things; code looks them up here. An unknown name raises a ``KeyError`` that lists the
valid names, so a typo in a preset is a one-line, actionable error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """A dictionary of named builders with a decorator to fill it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register ``fn`` under ``name`` (names are unique)."""

        def deco(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> T:
        """Return the builder for ``name``; unknown names list the valid ones."""
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def check_params(self, name: str, params: dict[str, Any], reserved: tuple[str, ...] = ()) -> None:
        """Raise ``ValueError`` naming any key of ``params`` the builder does not accept.

        ``reserved`` are arguments medseg fills itself (e.g. ``in_channels``); setting them in config is
        also an error because the value would be ignored or conflict.
        """
        fn = self.get(name)
        sig = inspect.signature(fn)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
            accepted = None
        else:
            accepted = set(sig.parameters) - set(reserved)
        for key in params:
            if key in reserved:
                raise ValueError(f"{key!r} is set by medseg, not in config ({self.kind} {name!r})")
            if accepted is not None and key not in accepted:
                raise ValueError(f"{self.kind} {name!r} has no parameter {key!r}; valid: {', '.join(sorted(accepted))}")
