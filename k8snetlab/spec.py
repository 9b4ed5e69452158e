"""Loading a cluster file: read (YAML, or a Python generator), parse, validate.

:mod:`k8snetlab.clusterspec` holds the typed values and the parser (re-exported here);
:mod:`k8snetlab.validate` is the one validation step. Everything a user can get wrong is
refused before anything is created, with one line naming the file, the key and the fix.

A topology that grows with parameters (``topologies/leaf_spine.py``) is a Python file whose
``cluster(**params)`` returns the same content as a dict; :func:`load` runs it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from .clusterspec import (ADDON_KINDS, DEFAULT_CLUSTER_CIDR, DEFAULT_NODE_MASK, DEFAULT_SERVICE_CIDR,
                          TOP_KEYS, ClusterSpec, CNISpec, HostSpec, LinkSpec, NetworkSpec, NodeSpec,
                          RouterSpec, SubnetSpec, SwitchSpec, UnderlaySpec, parse, parse_cni, parse_nodes)
from . import checks, yamlio
from .errors import SpecError
from .validate import validate

__all__ = ["ClusterSpec", "CNISpec", "HostSpec", "LinkSpec", "NetworkSpec", "NodeSpec", "RouterSpec",
           "SubnetSpec", "SwitchSpec", "UnderlaySpec", "DEFAULT_CLUSTER_CIDR", "DEFAULT_NODE_MASK",
           "DEFAULT_SERVICE_CIDR", "TOP_KEYS", "ADDON_KINDS", "load", "generate", "parse_params", "from_dict", "parse",
           "validate", "with_cni", "with_nodes", "with_underlay"]

# ---------------------------------------------------------------------------------------
def load(path: str | Path, cni: str | None = None, params: dict[str, Any] | None = None) -> ClusterSpec:
    """Read and validate a cluster file; ``cni`` overrides ``cni.type``.

    A ``.py`` file is a topology generator (see :func:`generate`): ``params`` are the keyword
    arguments of its ``cluster()``. A YAML file takes no parameters.

    A cluster file::

        name: three-nodes
        underlay:
          subnets:
            - {name: lan, cidr: 192.168.1.0/24}
        nodes:
          - {name: node1, ip: 192.168.1.129}
        network: {clusterCIDR: 10.244.0.0/16, nodeCIDRMaskSize: 24, serviceCIDR: 10.96.0.0/12}
        cni:
          type: host-gw            # bridge | host-gw | ipip | ...
          ipip: {datapath: auto}   # options of each mode in a section named after it
        workloads: [ <Kubernetes manifests, inline or {file: path}> ]
    """
    path = Path(path)
    if path.suffix == ".py":
        spec = from_dict(generate(path, params or {}), str(path), base_dir=path.parent)
        return with_cni(spec, cni) if cni else spec
    if params:
        raise SpecError(f"{path}: parameter {next(iter(params))!r} given, but only Python topology files "
                        "(.py) take parameters: remove --param or use a .py generator")
    text = checks.read_text(path, "cluster file")
    try:
        data = yamlio.load(text, str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}: not valid YAML{at}: {problem}; fix the syntax") from None
    spec = from_dict(data, str(path), base_dir=path.parent)
    return with_cni(spec, cni) if cni else spec


def generate(path: Path, params: dict[str, Any]) -> Any:
    """Run a Python topology file: it defines ``def cluster(**params) -> dict`` returning what a
    YAML cluster file holds. Parameters it does not take, or of another type than their
    default, are refused here with the valid ones; what the generator raises names the file."""
    import importlib.util
    import inspect
    import sys
    if not path.is_file():
        raise SpecError(f"{path}: cannot read topology file: no such file")
    name = f"_k8snetlab_topology_{path.stem}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise SpecError(f"{path}: cannot load it as Python")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module      # dataclasses and pickling look their module up there
    try:
        mod_spec.loader.exec_module(module)
    except SystemExit as e:
        raise SpecError(f"{path}: the topology generator called sys.exit({e.code!r}) while loading: "
                        "a topology file defines cluster() and raises an exception to refuse") from None
    except Exception as e:
        raise SpecError(f"{path}: loading the topology generator failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, "cluster", None)
    if not callable(fn):
        raise SpecError(f"{path}: a Python topology file defines def cluster(**params) -> dict; this one has none")
    sig = inspect.signature(fn)
    named = {n: p.default for n, p in sig.parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    valid = ", ".join(f"{n} (default {d!r})" if d is not inspect.Parameter.empty else n for n, d in named.items())
    for key, value in params.items():
        if key not in named:
            raise SpecError(f"{path}: unknown parameter {key!r}: valid parameters are {valid or '(none)'}")
        default = named[key]
        if default is not inspect.Parameter.empty and default is not None and not _same_kind(value, default):
            raise SpecError(f"{path}: parameter {key}: expected {type(default).__name__} like {default!r}, "
                            f"got {value!r}: valid parameters are {valid}")
    try:
        data = fn(**params)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None
    except SystemExit as e:
        raise SpecError(f"{path}: cluster() called sys.exit({e.code!r}): a topology generator returns "
                        "a dict, or raises an exception to refuse") from None
    except Exception as e:
        raise SpecError(f"{path}: cluster({', '.join(f'{k}={v!r}' for k, v in params.items())}) failed: "
                        f"{type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: cluster() must return a dict (a cluster file's content), "
                        f"not {type(data).__name__}")
    return data


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["leaves=4", "name=big"]`` (the CLI's ``--param``) -> ``{"leaves": 4, "name": "big"}``;
    values are read as YAML scalars, so numbers and booleans get their type."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"--param {item!r}: write NAME=VALUE, e.g. --param leaves=4")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def from_dict(data: Any, source: str = "<cluster>", base_dir: Path | None = None) -> ClusterSpec:
    """A cluster file's content (a dict) -> a validated ClusterSpec."""
    return validate(parse(data, source, base_dir))


def with_cni(spec: ClusterSpec, cni_type: str, **overrides: Any) -> ClusterSpec:
    """The same cluster with another CNI mode (options from its section, or defaults), validated."""
    raw = dict(spec.cni.sections)
    raw["type"] = cni_type
    if cni_type != "bridge":
        raw.pop("reference", None)   # the reference plugins serve bridge only
    raw.update(overrides)
    return validate(dataclasses.replace(spec, cni=parse_cni(raw, spec.source)))


def with_nodes(spec: ClusterSpec, raw_nodes: list[dict[str, Any]]) -> ClusterSpec:
    """The same cluster with another node list (cluster-file form), validated (for add_node)."""
    nodes = parse_nodes(raw_nodes, spec.underlay, spec.network, spec.source)
    return validate(dataclasses.replace(spec, nodes=nodes))


def with_underlay(spec: ClusterSpec, switch: str, controller: str = "none") -> ClusterSpec:
    """The same cluster on another kind of switch / controller app, checked like a file that said
    so (experiments compare ``linuxbridge`` with ``ovs`` + an app this way)."""
    u = dataclasses.replace(spec.underlay, switch=switch, controller=controller)
    new = validate(dataclasses.replace(spec, underlay=u, source=f"{spec.source} (with underlay.switch "
                                       f"{switch}, controller {controller})"))
    return dataclasses.replace(new, source=spec.source)
