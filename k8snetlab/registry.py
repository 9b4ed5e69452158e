"""Name -> implementation, for every axis of choice (CNI modes and plugins, kube-proxy modes,
add-ons, controller apps, BGP speakers, ...).

Each axis is one :class:`Registry` over one entry-point group: our own choices come from the
table in :mod:`k8snetlab.extensions`, other installed packages add theirs by declaring entry
points in that group. A name is imported only when it is asked for; a name that is unknown
lists the valid ones, and one that cannot be imported is an error with its cause.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Generic, Iterator, TypeVar

from .errors import K8sNetLabError, SpecError
from .extensions import ENTRY_POINTS

T = TypeVar("T")

OURS = "k8snetlab"     # the distribution name of this project


class ExtensionError(K8sNetLabError):
    """A registered choice cannot be used: its module fails to import, or two packages claim a name."""


def _installed(group: str) -> list[importlib.metadata.EntryPoint]:
    """Entry points of ``group`` from installed distributions other than ours (an installed copy
    of this project declares the same table, which wins: it is the tree being run)."""
    out = []
    for ep in importlib.metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        if dist is not None and (dist.metadata["Name"] or "").lower() == OURS:
            continue
        out.append(ep)
    return out


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else OURS


class Registry(Generic[T]):
    """The choices of one axis: ``names()``, ``get(name)``, ``entry(name)`` (no import)."""

    def __init__(self, what: str, group: str, base: type | None = None):
        self.what = what                    # for messages: "CNI type", "kube-proxy mode"...
        self.group = group
        self.base = base                    # what a loaded class must subclass, when given
        self._entries: dict[str, importlib.metadata.EntryPoint] | None = None
        self._loaded: dict[str, T] = {}

    def entries(self) -> dict[str, importlib.metadata.EntryPoint]:
        if self._entries is None:
            entries: dict[str, importlib.metadata.EntryPoint] = {}
            for line in ENTRY_POINTS.get(self.group, []):
                name, _, value = (s.strip() for s in line.partition("="))
                entries[name] = importlib.metadata.EntryPoint(name, value, self.group)
            for ep in _installed(self.group):
                have = entries.get(ep.name)
                if have is not None and have.value != ep.value:
                    raise ExtensionError(
                        f"{self.what} {ep.name!r} is declared twice in entry-point group {self.group}: "
                        f"{have.value} ({_dist_name(have)}) and {ep.value} ({_dist_name(ep)}): "
                        "uninstall one of the packages or rename its entry point")
                entries[ep.name] = ep
            self._entries = entries
        return self._entries

    def names(self) -> list[str]:
        return sorted(self.entries())

    def __contains__(self, name: object) -> bool:
        return name in self.entries()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def entry(self, name: str) -> importlib.metadata.EntryPoint:
        """Where ``name`` lives (``.module``, ``.attr``), without importing it."""
        try:
            return self.entries()[name]
        except KeyError:
            valid = ", ".join(self.names()) or "(none installed)"
            raise SpecError(f"unknown {self.what} {name!r}: use one of {valid}") from None

    def source(self, name: str) -> str:
        """The distribution that declares ``name`` (``k8snetlab`` for ours)."""
        return _dist_name(self.entry(name))

    def get(self, name: str) -> T:
        if name in self._loaded:
            return self._loaded[name]
        ep = self.entry(name)
        try:
            obj: Any = ep.load()
        except Exception as e:
            raise ExtensionError(f"{self.what} {name!r} ({ep.value}, from {_dist_name(ep)}) cannot be "
                                 f"loaded: {type(e).__name__}: {e}") from e
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise ExtensionError(f"{self.what} {name!r} ({ep.value}) is not a {self.base.__name__} subclass")
        self._loaded[name] = obj
        return obj

    def items(self) -> list[tuple[str, T]]:
        """Every choice, loaded (raises on the first that cannot be)."""
        return [(name, self.get(name)) for name in self.names()]

    def reset(self) -> None:
        """Read the installed entry points again (after a package was installed)."""
        self._entries = None
        self._loaded.clear()
