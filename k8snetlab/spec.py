"""Cluster file (YAML) -> a validated, typed, immutable :class:`ClusterSpec`.

The spec is plain data: importable and testable without root. The runtime builds live
objects from it and never mutates it. Everything a user can get wrong is caught here,
before anything is created, with one line naming the file, the key and the fix.

A topology that grows with parameters (``topologies/leaf_spine.py``) is a Python file whose
``cluster(**params)`` returns the same content as a dict; :func:`load` runs it.

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

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import yaml

from . import checks, manifests, shaping, yamlio
from .errors import SpecError
from .manifests import PodSpec, Workload

DEFAULT_CLUSTER_CIDR = "10.244.0.0/16"
DEFAULT_SERVICE_CIDR = "10.96.0.0/12"
DEFAULT_NODE_MASK = 24
TOP_KEYS = ("apiVersion", "kind", "name", "underlay", "nodes", "network", "cni", "kubeProxy", "networkPolicy",
            "workloads")
# API objects in ``workloads`` that add-ons parse and check (k8snetlab.policy): kept raw here
ADDON_KINDS = ("Namespace", "NetworkPolicy")


@dataclass(frozen=True)
class SubnetSpec:
    name: str
    cidr: IPv4Network
    gateway: IPv4Address | None = None   # the subnet's router address (nodes' default route)
    link: Any = None                     # shaping.LinkProps: rate, loss, delay, mtu of its ports


@dataclass(frozen=True)
class RouterSpec:
    """An underlay router: a host with forwarding on and one address per subnet it joins."""
    name: str
    interfaces: tuple[tuple[str, IPv4Address], ...]   # (subnet name, address)
    links: tuple[Any, ...] = ()                       # shaping.LinkProps or None, per interface


@dataclass(frozen=True)
class HostSpec:
    """A plain host on the underlay that is not a node (an external client, a load balancer)."""
    name: str
    subnet: str
    ip: IPv4Address


@dataclass(frozen=True)
class NodeSpec:
    name: str
    subnet: str
    ip: IPv4Address
    pod_cidr: IPv4Network
    labels: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class UnderlaySpec:
    subnets: tuple[SubnetSpec, ...]
    routers: tuple[RouterSpec, ...] = ()
    switch: str = "linuxbridge"
    hosts: tuple[HostSpec, ...] = ()
    # the switch level (k8snetlab.switching): OpenFlow controller app, switches, switch links
    controller: str = "none"
    switches: tuple[Any, ...] = ()      # switching.SwitchSpec
    links: tuple[Any, ...] = ()         # switching.LinkSpec

    def subnet(self, name: str) -> SubnetSpec:
        return next(s for s in self.subnets if s.name == name)


@dataclass(frozen=True)
class NetworkSpec:
    cluster_cidr: IPv4Network
    node_mask: int
    service_cidr: IPv4Network


@dataclass(frozen=True)
class CNISpec:
    type: str
    options: Any                          # the mode's options dataclass
    reference: bool = False               # drive Debian's reference plugin binaries instead of ours
    invoke: str = "exec"                  # exec | inprocess
    sections: dict[str, Any] = field(default_factory=dict, hash=False)  # raw per-mode sections


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    source: str
    underlay: UnderlaySpec
    nodes: tuple[NodeSpec, ...]
    network: NetworkSpec
    cni: CNISpec
    workloads: tuple[Workload, ...] = ()
    kube_proxy: dict[str, Any] = field(default_factory=dict, hash=False)
    # kind: Service manifests from ``workloads``, raw (k8snetlab.services parses and checks them)
    services: tuple[tuple[str, dict[str, Any]], ...] = field(default=(), hash=False)
    # kind: Namespace / NetworkPolicy manifests, raw, and the networkPolicy section (k8snetlab.policy)
    objects: tuple[tuple[str, dict[str, Any]], ...] = field(default=(), hash=False)
    network_policy: dict[str, Any] = field(default_factory=dict, hash=False)

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise SpecError(f"{self.source}: no node named {name!r}: nodes are {', '.join(n.name for n in self.nodes)}")

    def pods(self) -> list[PodSpec]:
        return manifests.expand(list(self.workloads))

    def with_cni(self, cni_type: str, **overrides: Any) -> "ClusterSpec":
        """The same cluster with another CNI mode (options from its section, or defaults)."""
        raw = dict(self.cni.sections)
        raw["type"] = cni_type
        if cni_type != "bridge":
            raw.pop("reference", None)   # the reference plugins serve bridge only
        raw.update(overrides)
        new = dataclasses.replace(self, cni=_parse_cni(raw, self.source))
        _validate_mode(new)
        return new


# ---------------------------------------------------------------------------------------
def load(path: str | Path, cni: str | None = None, params: dict[str, Any] | None = None) -> ClusterSpec:
    """Read and validate a cluster file; ``cni`` overrides ``cni.type``.

    A ``.py`` file is a topology generator (see :func:`generate`): ``params`` are the keyword
    arguments of its ``cluster()``. A YAML file takes no parameters.
    """
    path = Path(path)
    if path.suffix == ".py":
        spec = from_dict(generate(path, params or {}), str(path), base_dir=path.parent)
        return spec.with_cni(cni) if cni else spec
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
    return spec.with_cni(cni) if cni else spec


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
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a cluster file is a YAML mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise SpecError(f"{source}: unknown key {unknown[0]!r}: valid keys are {', '.join(TOP_KEYS)}")
    if data.get("kind", "Cluster") != "Cluster":
        raise SpecError(f"{source}: kind must be Cluster")
    name = data.get("name") or Path(source).stem.replace("_", "-")
    underlay = _parse_underlay(data.get("underlay"), source)
    network = _parse_network(data.get("network") or {}, source)
    nodes = _parse_nodes(data.get("nodes"), underlay, network, source)
    cni = _parse_cni(data.get("cni") or {"type": "bridge"}, source)
    workloads, services = _parse_workloads(data.get("workloads") or [], source, base_dir or Path("."))
    objects = [s for s in services if s[1].get("kind") in ADDON_KINDS]
    services = [s for s in services if s[1].get("kind") not in ADDON_KINDS]
    kp = data.get("kubeProxy") or {}
    if not isinstance(kp, dict):
        raise SpecError(f"{source}: kubeProxy must be a mapping like {{mode: iptables}}")
    npol = data.get("networkPolicy") or {}
    if not isinstance(npol, dict):
        raise SpecError(f"{source}: networkPolicy must be a mapping like {{dataplane: iptables}}")
    spec = ClusterSpec(str(name), source, underlay, nodes, network, cni, tuple(workloads), kp, tuple(services),
                       tuple(objects), npol)
    _check_addresses(spec)
    checks.check_usable_ranges(spec)
    checks.check_node_not_gateway(spec)
    checks.check_pod_bounds(spec)       # before any pod list is expanded
    _check_scheduling(spec)
    checks.check_reserved_names(spec, (p.name for p in spec.pods()))
    checks.check_container_commands(spec)
    _validate_mode(spec)
    return spec


# ---------------------------------------------------------------------------------------
def _net(value: Any, where: str) -> IPv4Network:
    try:
        return ipaddress.IPv4Network(str(value), strict=True)
    except ValueError as e:
        raise SpecError(f"{where}: {value!r} is not a valid IPv4 CIDR ({e}); write it like 10.244.0.0/16") from None


def _addr(value: Any, where: str) -> IPv4Address:
    try:
        return ipaddress.IPv4Address(str(value))
    except ValueError:
        raise SpecError(f"{where}: {value!r} is not a valid IPv4 address") from None


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise SpecError(f"{where}: must be a non-empty list")
    return value


def _map(value: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: must be a mapping with keys {', '.join(keys)}")
    bad = [k for k in value if k not in keys]
    if bad:
        raise SpecError(f"{where}: unknown key {bad[0]!r}: valid keys are {', '.join(keys)}")
    return value


def _ifname_safe(name: Any, where: str) -> str:
    if not isinstance(name, str) or not manifests.NAME_RE.match(name) or len(name) > 32:
        raise SpecError(f"{where}: {name!r} is not a valid name (lower-case letters, digits, '-')")
    return name


def _parse_underlay(raw: Any, src: str) -> UnderlaySpec:
    u = _map(raw, f"{src}: underlay", ("subnets", "routers", "hosts", "switch", "controller", "switches", "links"))
    subnets, seen = [], set()
    for i, s in enumerate(_list(u.get("subnets"), f"{src}: underlay.subnets")):
        w = f"{src}: underlay.subnets[{i}]"
        s = _map(s, w, ("name", "cidr", "gateway", "link"))
        name = _ifname_safe(s.get("name"), f"{w}.name")
        if name in seen:
            raise SpecError(f"{w}.name: duplicate subnet name {name!r}")
        seen.add(name)
        cidr = _net(s.get("cidr"), f"{w}.cidr")
        gw = _addr(s["gateway"], f"{w}.gateway") if s.get("gateway") else None
        if gw is not None and gw not in cidr:
            raise SpecError(f"{w}.gateway: {gw} is not inside {cidr}")
        subnets.append(SubnetSpec(name, cidr, gw, shaping.parse_link(s.get("link"), f"{w}.link")))
    for a in subnets:
        for b in subnets:
            if a is not b and a.cidr.overlaps(b.cidr):
                raise SpecError(f"{src}: underlay subnets {a.name} ({a.cidr}) and {b.name} ({b.cidr}) overlap")
    routers = []
    for i, r in enumerate(u.get("routers") or []):
        w = f"{src}: underlay.routers[{i}]"
        r = _map(r, w, ("name", "interfaces"))
        itfs, links = [], []
        for j, itf in enumerate(_list(r.get("interfaces"), f"{w}.interfaces")):
            itf = _map(itf, f"{w}.interfaces[{j}]", ("subnet", "ip", "link"))
            links.append(shaping.parse_link(itf.get("link"), f"{w}.interfaces[{j}].link"))
            if itf.get("subnet") not in seen:
                raise SpecError(f"{w}.interfaces[{j}].subnet: {itf.get('subnet')!r} is not a subnet of underlay.subnets")
            itfs.append((itf["subnet"], _addr(itf.get("ip"), f"{w}.interfaces[{j}].ip")))
        routers.append(RouterSpec(_ifname_safe(r.get("name"), f"{w}.name"), tuple(itfs),
                                  tuple(links) if any(links) else ()))
    hosts = []
    for i, h in enumerate(u.get("hosts") or []):
        w = f"{src}: underlay.hosts[{i}]"
        h = _map(h, w, ("name", "subnet", "ip"))
        ip = _addr(h.get("ip"), f"{w}.ip")
        sub = h.get("subnet") or next((s.name for s in subnets if ip in s.cidr), None)
        if sub not in seen:
            raise SpecError(f"{w}: {ip} is in none of the underlay subnets; give subnet: <name>")
        hosts.append(HostSpec(_ifname_safe(h.get("name"), f"{w}.name"), sub, ip))
    from . import switching
    sw = switching.parse(u, [s.name for s in subnets], src)
    return UnderlaySpec(tuple(subnets), tuple(routers), sw.switch, tuple(hosts), sw.controller,
                        sw.switches, sw.links)


def _parse_network(raw: Any, src: str) -> NetworkSpec:
    n = _map(raw, f"{src}: network", ("clusterCIDR", "nodeCIDRMaskSize", "serviceCIDR"))
    cluster = _net(n.get("clusterCIDR", DEFAULT_CLUSTER_CIDR), f"{src}: network.clusterCIDR")
    service = _net(n.get("serviceCIDR", DEFAULT_SERVICE_CIDR), f"{src}: network.serviceCIDR")
    mask = n.get("nodeCIDRMaskSize", DEFAULT_NODE_MASK)
    if not isinstance(mask, int) or not cluster.prefixlen <= mask <= 30:
        raise SpecError(f"{src}: network.nodeCIDRMaskSize: {mask!r} must be between the cluster "
                        f"CIDR's prefix ({cluster.prefixlen}) and 30")
    if cluster.overlaps(service):
        raise SpecError(f"{src}: network.clusterCIDR {cluster} overlaps network.serviceCIDR {service}: "
                        "choose disjoint ranges (defaults 10.244.0.0/16 and 10.96.0.0/12)")
    return NetworkSpec(cluster, mask, service)


def _parse_nodes(raw: Any, underlay: UnderlaySpec, network: NetworkSpec, src: str) -> tuple[NodeSpec, ...]:
    items = _list(raw, f"{src}: nodes")
    checks.check_node_count(len(items), f"{src}: nodes")
    free = network.cluster_cidr.subnets(new_prefix=network.node_mask)
    explicit = {}
    for i, n in enumerate(items):
        if isinstance(n, dict) and n.get("podCIDR"):
            explicit[i] = _net(n["podCIDR"], f"{src}: nodes[{i}].podCIDR")
    taken = set(explicit.values())
    nodes, names, ips = [], set(), set()
    for i, n in enumerate(items):
        w = f"{src}: nodes[{i}]"
        n = _map(n, w, ("name", "ip", "subnet", "podCIDR", "labels"))
        name = _ifname_safe(n.get("name"), f"{w}.name")
        if name in names:
            raise SpecError(f"{w}.name: duplicate node name {name!r}")
        names.add(name)
        ip = _addr(n.get("ip"), f"{w}.ip")
        if ip in ips:
            raise SpecError(f"{w}.ip: {ip} is used by another node")
        ips.add(ip)
        if n.get("subnet"):
            if n["subnet"] not in [s.name for s in underlay.subnets]:
                raise SpecError(f"{w}.subnet: no subnet named {n['subnet']!r} in underlay.subnets")
            subnet = underlay.subnet(n["subnet"])
        else:
            matches = [s for s in underlay.subnets if ip in s.cidr]
            if not matches:
                raise SpecError(f"{w}.ip: {ip} is in none of the underlay subnets "
                                f"({', '.join(str(s.cidr) for s in underlay.subnets)})")
            subnet = matches[0]
        if ip not in subnet.cidr or ip in (subnet.cidr.network_address, subnet.cidr.broadcast_address):
            raise SpecError(f"{w}.ip: {ip} is not a host address of subnet {subnet.name} ({subnet.cidr})")
        if i in explicit:
            pod_cidr = explicit[i]
            if not pod_cidr.subnet_of(network.cluster_cidr):
                raise SpecError(f"{w}.podCIDR: {pod_cidr} is outside network.clusterCIDR {network.cluster_cidr}")
        else:
            pod_cidr = next((c for c in free if not any(c.overlaps(t) for t in taken)), None)
            if pod_cidr is None:
                raise SpecError(f"{src}: network.clusterCIDR {network.cluster_cidr} has no room for a "
                                f"/{network.node_mask} for node {name}: use a larger cluster CIDR")
        taken.add(pod_cidr)
        labels = manifests._str_map(n.get("labels"), f"{w}.labels")
        labels.setdefault("kubernetes.io/hostname", name)
        nodes.append(NodeSpec(name, subnet.name, ip, pod_cidr, labels))
    for a in nodes:
        for b in nodes:
            if a is not b and a.pod_cidr.overlaps(b.pod_cidr):
                raise SpecError(f"{src}: podCIDR of {a.name} ({a.pod_cidr}) overlaps that of {b.name} ({b.pod_cidr})")
    return tuple(nodes)


def _parse_cni(raw: Any, src: str) -> CNISpec:
    from . import options
    from .cni import INVOKERS
    from .modes import MODES  # the registry imports the modes lazily
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise SpecError(f"{src}: cni must be a mapping like {{type: host-gw}}")
    cni_type = raw.get("type", "bridge")
    try:
        mode = MODES.get(cni_type)
    except SpecError as e:  # name the place: the registry only knows the valid names
        raise SpecError(f"{src}: cni.type: {e}") from None
    allowed = {"type", "reference", "invoke", *MODES.names()}
    bad = [k for k in raw if k not in allowed]
    if bad:
        raise SpecError(f"{src}: cni: unknown key {bad[0]!r}: valid keys are type, reference, invoke "
                        f"and a section per mode ({', '.join(MODES.names())})")
    for name in MODES.names():  # every section is validated, also those of other modes
        if name in raw:
            options.parse(MODES.get(name).Options, raw[name], f"{src}: cni.{name}")
    opts = options.parse(mode.Options, raw.get(cni_type), f"{src}: cni.{cni_type}")
    reference = raw.get("reference", False)
    if not isinstance(reference, bool):
        raise SpecError(f"{src}: cni.reference must be true or false")
    if reference and cni_type != "bridge":
        raise SpecError(f"{src}: cni.reference: the reference plugins (containernetworking-plugins) "
                        f"are used for type bridge only, not {cni_type}")
    invoke = raw.get("invoke", "exec")
    if invoke not in INVOKERS:
        raise SpecError(f"{src}: cni.invoke: {invoke!r} is not one of {', '.join(INVOKERS.names())}")
    return CNISpec(cni_type, opts, reference, invoke, dict(raw))


def _parse_workloads(items: Any, src: str, base: Path) -> tuple[list[Workload], list[tuple[str, dict]]]:
    """Workloads (Pod, Deployment, ReplicationController) and, apart, Service manifests."""
    if not isinstance(items, list):
        raise SpecError(f"{src}: workloads must be a list of manifests or {{file: path}}")
    out: list[Workload] = []
    services: list[tuple[str, dict]] = []

    def add(doc: Any, where: str) -> None:
        if isinstance(doc, dict) and doc.get("kind") in ("Service", *ADDON_KINDS):
            services.append((where, doc))
        else:
            out.append(manifests.parse_workload(doc, where))

    for i, item in enumerate(items):
        where = f"{src}: workloads[{i}]"
        if isinstance(item, dict) and set(item) == {"file"}:
            path = checks.workload_file(base, item["file"], f"{where}.file")
            try:
                docs = [d for d in yamlio.load_all(checks.read_text(path, "manifest file", f"{where}.file"), str(path))
                        if d is not None]
            except yaml.YAMLError as e:
                raise SpecError(f"{where}.file: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
            for j, d in enumerate(docs):
                add(d, f"{path}[{j}]")
        else:
            add(item, where)
    return out, services


def _check_addresses(spec: ClusterSpec) -> None:
    src = spec.source
    for s in spec.underlay.subnets:
        for label, net in (("clusterCIDR", spec.network.cluster_cidr), ("serviceCIDR", spec.network.service_cidr)):
            if s.cidr.overlaps(net):
                raise SpecError(f"{src}: underlay subnet {s.name} ({s.cidr}) overlaps network.{label} "
                                f"({net}): node and pod addresses must be distinct")
    node_subnets = list(dict.fromkeys(n.subnet for n in spec.nodes))
    if len(node_subnets) > 1:
        router_ips = {ip for r in spec.underlay.routers for _, ip in r.interfaces}
        for name in node_subnets:
            gw = spec.underlay.subnet(name).gateway
            if gw is None or gw not in router_ips:
                raise SpecError(f"{src}: underlay.subnets {name}: nodes are on several subnets, so subnet "
                                f"{name} needs a gateway that is an address of one of underlay.routers")
    used = {n.ip: f"node {n.name}" for n in spec.nodes}
    names = {n.name for n in spec.nodes}
    for h in spec.underlay.hosts:
        if h.name in names:
            raise SpecError(f"{src}: underlay host name {h.name!r} is already taken")
        if h.ip in used or h.ip not in spec.underlay.subnet(h.subnet).cidr:
            raise SpecError(f"{src}: underlay host {h.name}: {h.ip} is taken or not inside subnet {h.subnet}")
        names.add(h.name)
        used[h.ip] = f"host {h.name}"
    for r in spec.underlay.routers:
        if r.name in names:
            raise SpecError(f"{src}: router name {r.name!r} is also a node or host name")
        names.add(r.name)
        for subnet, ip in r.interfaces:
            if ip not in spec.underlay.subnet(subnet).cidr:
                raise SpecError(f"{src}: router {r.name}: {ip} is not inside subnet {subnet}")
            if ip in used:
                raise SpecError(f"{src}: router {r.name}: {ip} is already used by {used[ip]}")
            used[ip] = f"router {r.name}"


def _check_scheduling(spec: ClusterSpec) -> None:
    try:
        pods = spec.pods()
    except SpecError as e:
        raise SpecError(f"{spec.source}: workloads: {e}") from None
    nodes = {n.name for n in spec.nodes}
    clash = nodes & {p.host_name for p in pods}
    if clash:
        raise SpecError(f"{spec.source}: pod name {sorted(clash)[0]!r} is also a node name: rename the workload")
    for p in pods:
        if p.node_name and p.node_name not in nodes:
            raise SpecError(f"{spec.source}: pod {p.name}: nodeName {p.node_name!r} is not a node "
                            f"({', '.join(sorted(nodes))})")
        if p.node_selector and not any(all(n.labels.get(k) == v for k, v in p.node_selector.items())
                                       for n in spec.nodes):
            raise SpecError(f"{spec.source}: pod {p.name}: no node matches nodeSelector {p.node_selector}")


def _validate_mode(spec: ClusterSpec) -> None:
    from . import switching
    from .addons import addon_classes
    from .modes import MODES
    switching.check(spec)       # switch attachments; what kubeProxy.mode openflow needs
    MODES.get(spec.cni.type).validate(spec)
    for addon in addon_classes():
        addon.validate(spec)
