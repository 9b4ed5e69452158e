"""YAML in, with a bound on what aliases can expand to.

PyYAML's ``safe_load`` builds an alias as a shared reference, so a "billion laughs" file is
small in memory, but anything that walks it (validation, a message quoting a value) expands
it: a 1 kB file became a 39 MB error line or a MemoryError. Here the document is composed
first and its expanded size counted (linear in the distinct nodes); a document that would
expand beyond :data:`MAX_NODES` values is refused before anything is built from it.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import SpecError

MAX_NODES = 1_000_000          # values (scalars, lists, mappings) of one expanded document


def _expanded_size(node: yaml.Node, memo: dict[int, int], limit: int) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = limit + 1              # a cycle (a recursive alias) counts as too large
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            size += _expanded_size(child, memo, limit)
            if size > limit:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            size += _expanded_size(k, memo, limit) + _expanded_size(v, memo, limit)
            if size > limit:
                break
    memo[key] = size
    return size


def _construct(loader: yaml.SafeLoader, node: yaml.Node, where: str) -> Any:
    if _expanded_size(node, {}, MAX_NODES) > MAX_NODES:
        raise SpecError(f"{where}: YAML aliases (*name) expand to more than {MAX_NODES:,} values "
                        "(an alias bomb, or a recursive alias): write the content out")
    return loader.construct_document(node)


def load(text: str, where: str) -> Any:
    """``yaml.safe_load`` with the alias bound; YAML errors propagate as ``yaml.YAMLError``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _construct(loader, node, where)
    finally:
        loader.dispose()


def load_all(text: str, where: str) -> list[Any]:
    """``yaml.safe_load_all`` with the alias bound, as a list."""
    loader = yaml.SafeLoader(text)
    out = []
    try:
        while loader.check_node():
            out.append(_construct(loader, loader.get_node(), where))
    finally:
        loader.dispose()
    return out
