"""Parse a mode's options from its section of the cluster file into its dataclass.

Each mode (CNI type, route speaker, kube-proxy mode...) owns a dataclass of options with
defaults. Fields carry the Kubernetes / flannel / Calico spelling in ``metadata["key"]``
(``ipipMode``) and optional ``metadata["choices"]``. Unknown keys, wrong types and values
outside the choices are rejected at load time with the file, key and the valid values.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from .errors import SpecError

T = TypeVar("T")


def opt(default: Any, key: str | None = None, choices: Any = None,
        help: str = "", min: float | None = None, max: float | None = None) -> Any:
    """A dataclass field with its cluster-file key, allowed values (a tuple, or a registry whose
    names are the values) and a one-line help."""
    meta = {"key": key, "choices": choices, "help": help, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def choice_names(f: dataclasses.Field) -> list[str]:
    """The allowed values of an option, [] when any value of its type is."""
    choices = f.metadata.get("choices")
    if choices is None:
        return []
    return list(choices.names()) if hasattr(choices, "names") else [str(c) for c in choices]


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _check_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def parse(cls: type[T], data: Any, where: str) -> T:
    """Build ``cls`` from a mapping; ``where`` names the place (``file: cni.ipip``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{where}: must be a mapping of options, got {type(data).__name__}")
    fields = {_key(f): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise SpecError(f"{where}: unknown option {unknown[0]!r}: valid options are "
                        f"{', '.join(sorted(fields)) or '(none)'}")
    kwargs = {}
    for key, value in data.items():
        f = fields[key]
        if not _check_type(value, hints[f.name]):
            raise SpecError(f"{where}.{key}: expected {_type_name(hints[f.name])}, got {value!r}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise SpecError(f"{where}.{key}: {value!r} is not one of {', '.join(choice_names(f))}")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise SpecError(f"{where}.{key}: {value} is out of range {lo}..{hi}")
        kwargs[f.name] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return {_key(f): getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))
