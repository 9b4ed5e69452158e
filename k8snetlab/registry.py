"""Name -> class registries: every axis of choice (CNI mode, route speaker, kube-proxy mode,
topology, controller app) is one of these. Adding a choice is one module plus one
``@REGISTRY.register("name")`` line; an unknown name is an error listing the valid ones.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from .errors import SpecError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, modules: tuple[str, ...] = ()):
        self.what = what
        self._items: dict[str, T] = {}
        self._modules = modules  # imported lazily so that registering is side-effect free
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.what} {name!r} registered twice")
            self._items[name] = obj
            return obj
        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._modules:
                importlib.import_module(mod)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise SpecError(f"unknown {self.what} {name!r}: use one of {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items
