"""Named registries for every pluggable choice (backbones, data sources, samplers, heads...).

An unknown name is an error that lists the registered names, never a silent fall-through.

A registry may be *declared* with its names and their help (`entries`) and the module that
defines them (`home`): its names can then be checked and listed without importing that module
(raylt.choices declares every registry a config key names, so a misspelt name fails before
torch or Ray is imported), and `get` imports the home module on first use. Code outside raylt
registers further names with `register(name, help)` as it would into any registry.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, TypeVar

from raylt.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entries: dict[str, str] | None = None, home: str | None = None):
        self.kind = kind
        self.home = home
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = dict(entries or {})
        self._declared = frozenset(self._help)

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        """Register an object under `name`: a declared name takes its declared help."""
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            if name not in self._declared:
                self._help[name] = help or (getattr(obj, "__doc__", "") or "").strip().split("\n")[0]
            return obj

        return deco

    def check(self, name: str) -> None:
        """A one-line ConfigError for a name that is not registered (nothing is imported)."""
        if name not in self._help:
            close = difflib.get_close_matches(name, self._help, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(self.names())}")

    def get(self, name: str) -> T:
        self.check(name)
        if name not in self._items and self.home is not None:
            importlib.import_module(self.home)  # registers the declared names
        try:
            return self._items[name]
        except KeyError:  # declared, but its home module does not define it: a bug, not input
            raise LookupError(f"{self.kind} {name!r} is declared but {self.home} does not register it") from None

    @property
    def declared(self) -> frozenset[str]:
        """The names declared with the registry (its home module registers each)."""
        return self._declared

    def names(self) -> list[str]:
        return sorted(self._help)

    def describe(self) -> list[tuple[str, str]]:
        return [(n, self._help[n]) for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._help
