"""A cluster file as typed, immutable values: the dataclasses, and the parser that builds them.

Plain data, importable and testable without root; the runtime never mutates it. The parser
checks the structure (keys, types, names, addresses within each section) and asks no
registry: what the CNI mode, the add-ons and the controller app make of the file is checked
afterwards by :mod:`k8snetlab.validate`. :mod:`k8snetlab.spec` reads files and runs both.
"""

from __future__ import annotations

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
SWITCH_KINDS = ("linuxbridge", "ovs")
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
class SwitchSpec:
    name: str
    subnet: str
    attach: tuple[str, ...] = ()


@dataclass(frozen=True)
class LinkSpec:
    a: str
    b: str


@dataclass(frozen=True)
class UnderlaySpec:
    subnets: tuple[SubnetSpec, ...]
    routers: tuple[RouterSpec, ...] = ()
    switch: str = "linuxbridge"
    hosts: tuple[HostSpec, ...] = ()
    # the switch level (k8snetlab.switching plans it): OpenFlow controller app, switches, links
    controller: str = "none"
    switches: tuple[SwitchSpec, ...] = ()
    links: tuple[LinkSpec, ...] = ()

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
    options: Any                          # the mode's options dataclass (None until validated)
    reference: bool = False               # drive Debian's reference plugin binaries instead of ours
    invoke: str = "exec"                  # exec | inprocess
    sections: dict[str, Any] = field(default_factory=dict, hash=False)  # raw per-mode sections
    # the chained plugins after the mode's own (cni.chain; the mode's default until validated)
    chain: tuple[str, ...] | None = None
    chain_sysctl: dict[str, str] = field(default_factory=dict, hash=False)
    chain_reference: bool = False         # the chained plugins are Debian's reference binaries


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


# ---------------------------------------------------------------------------------------
def parse(data: Any, source: str = "<cluster>", base_dir: Path | None = None) -> ClusterSpec:
    """A cluster file's content -> ClusterSpec, not yet validated (see :mod:`k8snetlab.validate`)."""
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
    nodes = parse_nodes(data.get("nodes"), underlay, network, source)
    cni = parse_cni(data.get("cni") or {"type": "bridge"}, source)
    workloads, services = _parse_workloads(data.get("workloads") or [], source, base_dir or Path("."))
    objects = [s for s in services if s[1].get("kind") in ADDON_KINDS]
    services = [s for s in services if s[1].get("kind") not in ADDON_KINDS]
    kp = data.get("kubeProxy") or {}
    if not isinstance(kp, dict):
        raise SpecError(f"{source}: kubeProxy must be a mapping like {{mode: iptables}}")
    npol = data.get("networkPolicy") or {}
    if not isinstance(npol, dict):
        raise SpecError(f"{source}: networkPolicy must be a mapping like {{dataplane: iptables}}")
    return ClusterSpec(str(name), source, underlay, nodes, network, cni, tuple(workloads), kp, tuple(services),
                       tuple(objects), npol)


# ---------------------------------------------------------------------------------------
def parse_cidr(value: Any, where: str) -> IPv4Network:
    try:
        return ipaddress.IPv4Network(str(value), strict=True)
    except ValueError as e:
        raise SpecError(f"{where}: {value!r} is not a valid IPv4 CIDR ({e}); write it like 10.244.0.0/16") from None


def parse_address(value: Any, where: str) -> IPv4Address:
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
        cidr = parse_cidr(s.get("cidr"), f"{w}.cidr")
        gw = parse_address(s["gateway"], f"{w}.gateway") if s.get("gateway") else None
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
            itfs.append((itf["subnet"], parse_address(itf.get("ip"), f"{w}.interfaces[{j}].ip")))
        routers.append(RouterSpec(_ifname_safe(r.get("name"), f"{w}.name"), tuple(itfs),
                                  tuple(links) if any(links) else ()))
    hosts = []
    for i, h in enumerate(u.get("hosts") or []):
        w = f"{src}: underlay.hosts[{i}]"
        h = _map(h, w, ("name", "subnet", "ip"))
        ip = parse_address(h.get("ip"), f"{w}.ip")
        sub = h.get("subnet") or next((s.name for s in subnets if ip in s.cidr), None)
        if sub not in seen:
            raise SpecError(f"{w}: {ip} is in none of the underlay subnets; give subnet: <name>")
        hosts.append(HostSpec(_ifname_safe(h.get("name"), f"{w}.name"), sub, ip))
    switch, controller, switches, links = _parse_switches(u, [s.name for s in subnets], src)
    return UnderlaySpec(tuple(subnets), tuple(routers), switch, tuple(hosts), controller, switches, links)


def _parse_network(raw: Any, src: str) -> NetworkSpec:
    n = _map(raw, f"{src}: network", ("clusterCIDR", "nodeCIDRMaskSize", "serviceCIDR"))
    cluster = parse_cidr(n.get("clusterCIDR", DEFAULT_CLUSTER_CIDR), f"{src}: network.clusterCIDR")
    service = parse_cidr(n.get("serviceCIDR", DEFAULT_SERVICE_CIDR), f"{src}: network.serviceCIDR")
    mask = n.get("nodeCIDRMaskSize", DEFAULT_NODE_MASK)
    if not isinstance(mask, int) or not cluster.prefixlen <= mask <= 30:
        raise SpecError(f"{src}: network.nodeCIDRMaskSize: {mask!r} must be between the cluster "
                        f"CIDR's prefix ({cluster.prefixlen}) and 30")
    if cluster.overlaps(service):
        raise SpecError(f"{src}: network.clusterCIDR {cluster} overlaps network.serviceCIDR {service}: "
                        "choose disjoint ranges (defaults 10.244.0.0/16 and 10.96.0.0/12)")
    return NetworkSpec(cluster, mask, service)


def parse_nodes(raw: Any, underlay: UnderlaySpec, network: NetworkSpec, src: str) -> tuple[NodeSpec, ...]:
    items = _list(raw, f"{src}: nodes")
    checks.check_node_count(len(items), f"{src}: nodes")
    free = network.cluster_cidr.subnets(new_prefix=network.node_mask)
    explicit = {}
    for i, n in enumerate(items):
        if isinstance(n, dict) and n.get("podCIDR"):
            explicit[i] = parse_cidr(n["podCIDR"], f"{src}: nodes[{i}].podCIDR")
    taken = set(explicit.values())
    nodes, names, ips = [], set(), set()
    for i, n in enumerate(items):
        w = f"{src}: nodes[{i}]"
        n = _map(n, w, ("name", "ip", "subnet", "podCIDR", "labels"))
        name = _ifname_safe(n.get("name"), f"{w}.name")
        if name in names:
            raise SpecError(f"{w}.name: duplicate node name {name!r}")
        names.add(name)
        ip = parse_address(n.get("ip"), f"{w}.ip")
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


def parse_cni(raw: Any, src: str) -> CNISpec:
    """The ``cni`` section's structure; its mode, options and invoker are checked by the validation."""
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise SpecError(f"{src}: cni must be a mapping like {{type: host-gw}}")
    cni_type = raw.get("type", "bridge")
    if not isinstance(cni_type, str):
        raise SpecError(f"{src}: cni.type: {cni_type!r} is not a mode name")
    reference = raw.get("reference", False)
    if not isinstance(reference, bool):
        raise SpecError(f"{src}: cni.reference must be true or false")
    invoke = raw.get("invoke", "exec")
    if not isinstance(invoke, str):
        raise SpecError(f"{src}: cni.invoke: {invoke!r} is not an invoker name")
    return CNISpec(cni_type, None, reference, invoke, dict(raw))


def _parse_switches(u: dict[str, Any], subnets: list[str], src: str
                    ) -> tuple[str, str, tuple[SwitchSpec, ...], tuple[LinkSpec, ...]]:
    """``underlay.switch``, ``.controller``, ``.switches``, ``.links`` (rules: :mod:`k8snetlab.switching`)."""
    switch = u.get("switch", "linuxbridge")
    if switch not in SWITCH_KINDS:
        raise SpecError(f"{src}: underlay.switch: {switch!r} is not one of {', '.join(SWITCH_KINDS)}")
    controller = u.get("controller", "none")
    controller = "none" if controller is None else controller
    if not isinstance(controller, str):
        raise SpecError(f"{src}: underlay.controller: {controller!r} is not an app name")
    switches: list[SwitchSpec] = []
    names: set[str] = set()
    raw_switches = u.get("switches") or []
    if not isinstance(raw_switches, list):
        raise SpecError(f"{src}: underlay.switches must be a list like [{{name: leaf1, subnet: lan}}]")
    for i, s in enumerate(raw_switches):
        w = f"{src}: underlay.switches[{i}]"
        s = _map(s, w, ("name", "subnet", "attach"))
        name = _ifname_safe(s.get("name"), f"{w}.name")
        if name in names:
            raise SpecError(f"{w}.name: duplicate switch name {name!r}")
        if name in subnets:
            raise SpecError(f"{w}.name: {name!r} is also a subnet name: give the switch another name")
        subnet = s.get("subnet") if len(subnets) > 1 else s.get("subnet", subnets[0])
        if subnet not in subnets:
            raise SpecError(f"{w}.subnet: {subnet!r} is not a subnet of underlay.subnets "
                            f"({', '.join(subnets)})")
        attach = s.get("attach") or []
        if not isinstance(attach, list) or not all(isinstance(a, str) for a in attach):
            raise SpecError(f"{w}.attach: must be a list of node, host or router names")
        names.add(name)
        switches.append(SwitchSpec(name, subnet, tuple(attach)))
    return switch, controller, tuple(switches), _parse_links(u.get("links") or [], {s.name: s for s in switches}, src)


def _parse_links(raw: Any, switches: dict[str, SwitchSpec], src: str) -> tuple[LinkSpec, ...]:
    if not isinstance(raw, list):
        raise SpecError(f"{src}: underlay.links must be a list of [switch, switch] pairs")
    out = []
    for i, link in enumerate(raw):
        w = f"{src}: underlay.links[{i}]"
        if not isinstance(link, list) or len(link) != 2:
            raise SpecError(f"{w}: write a link as [switch-a, switch-b]")
        for end in link:
            if end not in switches:
                raise SpecError(f"{w}: {end!r} is not a switch of underlay.switches "
                                f"({', '.join(switches) or 'none declared'})")
        a, b = switches[link[0]], switches[link[1]]
        if a.name == b.name:
            raise SpecError(f"{w}: a link joins two different switches, not {a.name} with itself")
        if a.subnet != b.subnet:
            raise SpecError(f"{w}: {a.name} is on subnet {a.subnet} and {b.name} on {b.subnet}: a subnet is "
                            "one L2 segment; join subnets with underlay.routers instead")
        out.append(LinkSpec(a.name, b.name))
    return tuple(out)


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


