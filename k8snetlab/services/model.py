"""Services as data: manifests in Kubernetes' own schema, the ``kubeProxy`` options, and
the allocation of ClusterIPs and nodePorts.

Everything here is plain data, checked without root at spec-load time, so that a bad
Service stops with one line naming the file, the key, the problem and the fix before a
single namespace exists. The runtime (:mod:`.endpoints`, :mod:`.addon`, the proxiers) only
ever sees the frozen dataclasses below; a :class:`Snapshot` is the whole desired state that
every kube-proxy mode, the cluster DNS and the load balancer are handed on each change.

What the API server would do is done by :class:`ServiceAllocator`: a fixed ``clusterIP`` is
honoured when it lies in the service CIDR and is free, the others are handed out in order
(``.10`` stays reserved for kube-dns); nodePorts come from 30000-32767, fixed ones checked.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import SpecError
from ..manifests import NAME_RE, check_name, mapping
from ..options import opt
from ..options import parse as parse_options

if TYPE_CHECKING:  # pragma: no cover
    from ..clusterspec import ClusterSpec

SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
PROTOCOLS = ("TCP", "UDP")
NODE_PORT_MIN, NODE_PORT_MAX = 30000, 32767
DEFAULT_AFFINITY_TIMEOUT = 10800          # seconds, Kubernetes' default (3 hours)
MAX_AFFINITY_TIMEOUT = 86400
DNS_SERVICE = "kube-system/kube-dns"
DNS_OFFSET = 10                           # kube-dns lives at the service CIDR's tenth address
FIRST_DYNAMIC_OFFSET = 11                 # dynamic ClusterIPs are handed out from here on
LB_POOL_PREFIX = 28                       # default loadBalancerPool: the last /28 of the first node subnet

# spec keys we implement, and keys Kubernetes knows that we accept only with their default
SPEC_KEYS = ("type", "clusterIP", "ports", "selector", "sessionAffinity", "sessionAffinityConfig",
             "externalTrafficPolicy")
SPEC_DEFAULTS: dict[str, Any] = {"clusterIPs": None, "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                                 "internalTrafficPolicy": "Cluster", "allocateLoadBalancerNodePorts": True,
                                 "publishNotReadyAddresses": False}
PORT_KEYS = ("name", "protocol", "port", "targetPort", "nodePort", "appProtocol")
IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


# -- the contract shared by every proxier, the DNS and the load balancer ----------------------
@dataclass(frozen=True)
class ServicePort:
    name: str                 # "" when the Service has a single unnamed port
    protocol: str             # "TCP" | "UDP"
    port: int
    target_port: int | str    # a number, or a container port name
    node_port: int | None     # allocated (30000-32767) for NodePort and LoadBalancer


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    type: str                 # "ClusterIP" | "NodePort" | "LoadBalancer"
    cluster_ip: str | None    # None = headless (clusterIP: None); "" = not allocated yet
    ports: tuple[ServicePort, ...]
    selector: dict[str, str] = field(hash=False)
    session_affinity: str = "None"             # "None" | "ClientIP"
    affinity_timeout: int = DEFAULT_AFFINITY_TIMEOUT
    external_traffic_policy: str = "Cluster"   # "Cluster" | "Local"
    load_balancer_ip: str | None = None        # external IP assigned from the pool (LoadBalancer)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def headless(self) -> bool:
        return self.cluster_ip is None

    @property
    def external(self) -> bool:
        """Reachable from outside the cluster (nodePorts, a load balancer IP)."""
        return self.type in ("NodePort", "LoadBalancer")

    def port_name(self, port: ServicePort) -> str:
        """kube-proxy's ServicePortName: ``ns/name`` or ``ns/name:port`` (the string its chain
        names hash)."""
        return f"{self.key}:{port.name}" if port.name else self.key


@dataclass(frozen=True)
class Endpoint:
    ip: str
    node: str                 # node name the pod runs on
    pod: str
    ports: dict[str, int] = field(hash=False)   # ServicePort.name -> resolved target port


@dataclass(frozen=True)
class Snapshot:
    """What every proxier / DNS / LB receives: the whole desired state."""
    services: tuple[Service, ...]
    endpoints: dict[str, tuple[Endpoint, ...]] = field(hash=False)   # Service.key -> ready endpoints
    version: int = 0

    def service(self, key: str) -> Service | None:
        return self._by_key.get(key)

    @cached_property
    def _by_key(self) -> dict[str, Service]:
        return {s.key: s for s in self.services}

    def port_endpoints(self, svc: Service, port: ServicePort) -> list[tuple[Endpoint, int]]:
        """The ready endpoints of one service port with the port each one listens on
        (pods lacking a named target port are left out, as in Kubernetes)."""
        return [(e, e.ports[port.name]) for e in self.endpoints.get(svc.key, ()) if port.name in e.ports]


# -- kube-proxy options --------------------------------------------------------------------------
@dataclass
class KubeProxyOptions:
    """The cluster file's ``kubeProxy`` section (KubeProxyConfiguration spelling)."""
    mode: str = opt("iptables", help="iptables | nftables | userspace | ipvs (where the kernel has IPVS)")
    sync_period: float = opt(1.0, key="syncPeriod", min=0.05, max=3600,
                             help="seconds between resyncs (a full one when the node's rules were changed by hand)")
    masquerade_all: bool = opt(False, key="masqueradeAll", help="SNAT all traffic to ClusterIPs")
    load_balancer_pool: str | None = opt(None, key="loadBalancerPool",
                                         help="CIDR on an underlay subnet (default: its last /28)")
    external_host: str | None = opt(None, key="externalHost",
                                    help="address of the 'external' client host (default: a free one)")
    dns: bool = opt(True, help="run cluster DNS (kube-dns at the service CIDR's tenth address)")
    iptables_backend: str = opt("nft", key="iptablesBackend", choices=("nft", "legacy"),
                                help="iptables mode: the iptables-nft (Debian's default) or "
                                     "iptables-legacy binaries, as kube-proxy's image picks one")


def parse_kube_proxy(spec: "ClusterSpec") -> KubeProxyOptions:
    """Parse and check the ``kubeProxy`` section; fill in the pool and the external host.
    (Whether ``mode`` names a kube-proxy mode is the add-on's check, against the registry.)"""
    src = spec.source
    opts = parse_options(KubeProxyOptions, spec.kube_proxy, f"{src}: kubeProxy")
    used = _underlay_addresses(spec)
    first = spec.underlay.subnet(spec.nodes[0].subnet).cidr
    if opts.load_balancer_pool is None:
        pool = _default_pool(first, used)
    else:
        pool = _pool(opts.load_balancer_pool, spec, used)
    if opts.external_host is None:
        ext = _free_address(first, used, pool)
        if ext is None:
            raise SpecError(f"{src}: kubeProxy.externalHost: no free address left in subnet {first} "
                            "for the external client host: set kubeProxy.externalHost")
    else:
        ext = _external(opts.external_host, spec, used, pool)
    opts.load_balancer_pool = str(pool) if pool is not None else None
    opts.external_host = str(ext)
    return opts


def _underlay_addresses(spec: "ClusterSpec") -> dict[IPv4Address, str]:
    used = {n.ip: f"node {n.name}" for n in spec.nodes}
    used.update({h.ip: f"host {h.name}" for h in spec.underlay.hosts})
    used.update({ip: f"router {r.name}" for r in spec.underlay.routers for _, ip in r.interfaces})
    used.update({s.gateway: f"the gateway of {s.name}" for s in spec.underlay.subnets if s.gateway})
    return used


def _default_pool(subnet: IPv4Network, used: dict[IPv4Address, str]) -> IPv4Network | None:
    if subnet.prefixlen > LB_POOL_PREFIX - 1:
        return None          # too small to spare a /28 (checked again if a LoadBalancer exists)
    pool = list(subnet.subnets(new_prefix=LB_POOL_PREFIX))[-1]
    return None if any(a in pool for a in used) else pool


def _pool(value: str, spec: "ClusterSpec", used: dict[IPv4Address, str]) -> IPv4Network:
    where = f"{spec.source}: kubeProxy.loadBalancerPool"
    try:
        pool = ipaddress.IPv4Network(value, strict=True)
    except ValueError as e:
        raise SpecError(f"{where}: {value!r} is not a valid IPv4 CIDR ({e}); write it like 192.168.1.240/28") from None
    if not any(pool.subnet_of(s.cidr) for s in spec.underlay.subnets):
        raise SpecError(f"{where}: {pool} is not inside any underlay subnet "
                        f"({', '.join(str(s.cidr) for s in spec.underlay.subnets)}): pick a range of one")
    clash = next((a for a in used if a in pool), None)
    if clash is not None:
        raise SpecError(f"{where}: {pool} holds {clash}, the address of {used[clash]}: pick a free range")
    return pool


def _free_address(subnet: IPv4Network, used: dict[IPv4Address, str],
                  pool: IPv4Network | None) -> IPv4Address | None:
    """The highest host address of ``subnet`` that nobody uses and the pool does not hold."""
    for a in reversed(list(subnet.hosts())):
        if a not in used and (pool is None or a not in pool):
            return a
    return None


def _external(value: str, spec: "ClusterSpec", used: dict[IPv4Address, str],
              pool: IPv4Network | None) -> IPv4Address:
    where = f"{spec.source}: kubeProxy.externalHost"
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        raise SpecError(f"{where}: {value!r} is not a valid IPv4 address") from None
    if not any(addr in s.cidr for s in spec.underlay.subnets):
        raise SpecError(f"{where}: {addr} is in none of the underlay subnets: pick an address of one")
    if addr in used:
        raise SpecError(f"{where}: {addr} is already used by {used[addr]}: pick a free address")
    if pool is not None and addr in pool:
        raise SpecError(f"{where}: {addr} is inside kubeProxy.loadBalancerPool {pool}: pick another address")
    return addr


# -- Service manifests ---------------------------------------------------------------------------
def parse_service(doc: Any, where: str) -> Service:
    """One ``kind: Service`` manifest -> :class:`Service` (ClusterIP and nodePorts may still be
    unallocated: ``cluster_ip == ""`` and ``node_port is None``)."""
    doc = mapping(doc, where)
    if doc.get("kind", "Service") != "Service":
        raise SpecError(f"{where}.kind: {doc.get('kind')!r} is not Service")
    meta = mapping(doc.get("metadata"), f"{where}.metadata")
    name = check_name(meta.get("name"), f"{where}.metadata.name")
    namespace = check_name(meta.get("namespace", "default"), f"{where}.metadata.namespace")
    spec = mapping(doc.get("spec"), f"{where}.spec")
    w = f"{where}.spec"
    for key, value in spec.items():
        if key in SPEC_KEYS:
            continue
        if key in SPEC_DEFAULTS:
            if key == "clusterIPs":
                if value not in (None, [], [spec.get("clusterIP")]):
                    raise SpecError(f"{w}.clusterIPs: must equal [clusterIP] (single-stack IPv4 only): "
                                    "remove it or make it match")
            elif value != SPEC_DEFAULTS[key]:
                raise SpecError(f"{w}.{key}: only {SPEC_DEFAULTS[key]!r} is supported by the testbed: remove it")
            continue
        if key in ("loadBalancerIP", "externalIPs", "loadBalancerSourceRanges", "externalName",
                   "healthCheckNodePort", "loadBalancerClass", "trafficDistribution"):
            raise SpecError(f"{w}.{key}: not supported by the testbed (LoadBalancer IPs come from "
                            "kubeProxy.loadBalancerPool): remove it")
        raise SpecError(f"{w}: unknown key {key!r}: valid keys are {', '.join(SPEC_KEYS)}")
    stype = spec.get("type", "ClusterIP")
    if stype == "ExternalName":
        raise SpecError(f"{w}.type: ExternalName Services are not supported: use {', '.join(SERVICE_TYPES)}")
    if stype not in SERVICE_TYPES:
        raise SpecError(f"{w}.type: {stype!r} is not a Service type: use one of {', '.join(SERVICE_TYPES)}")
    cluster_ip = _cluster_ip(spec.get("clusterIP"), stype, f"{w}.clusterIP")
    ports = _ports(spec.get("ports"), stype, cluster_ip is None, f"{w}.ports")
    selector = _selector(spec.get("selector"), f"{w}.selector")
    affinity = spec.get("sessionAffinity", "None")
    if affinity not in ("None", "ClientIP"):
        raise SpecError(f"{w}.sessionAffinity: {affinity!r} must be None or ClientIP")
    timeout = _affinity_timeout(spec.get("sessionAffinityConfig"), affinity, f"{w}.sessionAffinityConfig")
    etp = spec.get("externalTrafficPolicy", "Cluster")
    if etp not in ("Cluster", "Local"):
        raise SpecError(f"{w}.externalTrafficPolicy: {etp!r} must be Cluster or Local")
    if etp == "Local" and stype == "ClusterIP":
        raise SpecError(f"{w}.externalTrafficPolicy: Local applies to NodePort and LoadBalancer Services "
                        "only: remove it or set type: NodePort")
    return Service(name, namespace, stype, cluster_ip, ports, selector, affinity, timeout, etp)


def _cluster_ip(value: Any, stype: str, where: str) -> str | None:
    if value in (None, ""):
        return ""
    if value == "None":
        if stype != "ClusterIP":
            raise SpecError(f"{where}: None (headless) is only valid for type ClusterIP, not {stype}: "
                            "remove clusterIP or set type: ClusterIP")
        return None
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        raise SpecError(f"{where}: {value!r} is not an IPv4 address, None (headless) or empty") from None


def _port_number(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise SpecError(f"{where}: {value!r} must be a port number 1-65535")
    return value


def _ports(raw: Any, stype: str, headless: bool, where: str) -> tuple[ServicePort, ...]:
    if raw is None or raw == []:
        if headless:
            return ()
        raise SpecError(f"{where}: a Service needs at least one port, e.g. [{{port: 80, targetPort: 8080}}]")
    if not isinstance(raw, list):
        raise SpecError(f"{where}: must be a list of ports")
    ports: list[ServicePort] = []
    for i, p in enumerate(raw):
        pw = f"{where}[{i}]"
        p = mapping(p, pw)
        bad = [k for k in p if k not in PORT_KEYS]
        if bad:
            raise SpecError(f"{pw}: unknown key {bad[0]!r}: valid keys are {', '.join(PORT_KEYS)}")
        name = p.get("name", "")
        if name != "" and (not isinstance(name, str) or not NAME_RE.match(name) or len(name) > 63):
            raise SpecError(f"{pw}.name: {name!r} is not a valid port name (lower-case letters, digits, '-')")
        if name == "" and len(raw) > 1:
            raise SpecError(f"{pw}.name: required when a Service has more than one port: name every port")
        proto = p.get("protocol", "TCP")
        if proto not in PROTOCOLS:
            raise SpecError(f"{pw}.protocol: {proto!r} is not supported: use TCP or UDP")
        port = _port_number(p.get("port"), f"{pw}.port")
        target = p.get("targetPort", port)
        if isinstance(target, str) and not target.isdigit():
            if len(target) > 15 or not IANA_SVC_NAME.match(target):
                raise SpecError(f"{pw}.targetPort: {target!r} is neither a port number nor a valid "
                                "container port name (at most 15 lower-case letters, digits, '-')")
        else:
            target = _port_number(int(target) if isinstance(target, str) else target, f"{pw}.targetPort")
        node_port = p.get("nodePort")
        if node_port is not None:
            if stype == "ClusterIP":
                raise SpecError(f"{pw}.nodePort: only NodePort and LoadBalancer Services have nodePorts: "
                                "remove it or set type: NodePort")
            if not isinstance(node_port, int) or isinstance(node_port, bool) \
                    or not NODE_PORT_MIN <= node_port <= NODE_PORT_MAX:
                raise SpecError(f"{pw}.nodePort: {node_port!r} is outside the node port range "
                                f"{NODE_PORT_MIN}-{NODE_PORT_MAX}: pick one inside or leave it out")
        for j, q in enumerate(ports):
            if q.name == name:
                raise SpecError(f"{pw}.name: duplicate port name {name!r} (also ports[{j}]): rename one")
            if (q.port, q.protocol) == (port, proto):
                raise SpecError(f"{pw}: duplicate port {port}/{proto} (also ports[{j}]): "
                                "use another port or protocol")
            if node_port is not None and q.node_port == node_port and q.protocol == proto:
                raise SpecError(f"{pw}.nodePort: {node_port}/{proto} is also ports[{j}]'s nodePort: pick another")
        ports.append(ServicePort(name, proto, port, target, node_port))
    return tuple(ports)


def _selector(raw: Any, where: str) -> dict[str, str]:
    raw = mapping(raw, where)
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
            raise SpecError(f"{where}: keys and values must be strings (matchLabels style)")
    return {k: str(v) for k, v in raw.items()}


def _affinity_timeout(raw: Any, affinity: str, where: str) -> int:
    cfg = mapping(raw, where)
    client = mapping(cfg.get("clientIP"), f"{where}.clientIP")
    timeout = client.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        raise SpecError(f"{where}.clientIP.timeoutSeconds: {timeout!r} must be 1-{MAX_AFFINITY_TIMEOUT}")
    if raw is not None and affinity != "ClientIP":
        raise SpecError(f"{where}: only meaningful with sessionAffinity: ClientIP: remove it or set that")
    return timeout


# -- allocation ----------------------------------------------------------------------------------
class ServiceAllocator:
    """ClusterIPs from the service CIDR and nodePorts from 30000-32767, without collisions.

    The ``.10`` address is kept for ``kube-system/kube-dns`` (when cluster DNS is on).
    Dynamic addresses are handed out in order from ``.11`` and nodePorts from 30000, so
    that the same cluster file always gives the same addresses (easier to read in a trace).
    """

    def __init__(self, service_cidr: IPv4Network, dns: bool = True):
        self.cidr = service_cidr
        self.cluster_ips: dict[str, str] = {}     # ip -> service key
        self.node_ports: dict[int, str] = {}      # nodePort -> service key
        self.dns_ip = str(service_cidr.network_address + DNS_OFFSET) if dns else None
        self._ip_cursor = FIRST_DYNAMIC_OFFSET     # where the next search starts (then wraps)
        self._port_cursor = NODE_PORT_MIN

    def allocate(self, svc: Service, where: str) -> Service:
        """Give ``svc`` its ClusterIP and nodePorts; raise SpecError naming ``where``."""
        self.reserve(svc, where)
        return self.fill(svc, where)

    def reserve(self, svc: Service, where: str) -> None:
        """Check and take the ClusterIP and nodePorts ``svc`` asks for by value."""
        if svc.cluster_ip:
            self._check_ip(svc.cluster_ip, svc.key, f"{where}.spec.clusterIP")
        for i, p in enumerate(svc.ports):
            owner = self.node_ports.get(p.node_port) if p.node_port is not None else None
            if owner is not None and owner != svc.key:
                raise SpecError(f"{where}.spec.ports[{i}].nodePort: {p.node_port} is already taken by "
                                f"Service {owner}: pick another or leave it out")
        if svc.cluster_ip:
            self.cluster_ips[svc.cluster_ip] = svc.key
        for p in svc.ports:
            if p.node_port is not None:
                self.node_ports[p.node_port] = svc.key

    def fill(self, svc: Service, where: str) -> Service:
        """Hand out what ``svc`` left to the allocator (after :meth:`reserve`)."""
        ip = svc.cluster_ip
        if ip == "":
            ip = self._next_ip(where)
            self.cluster_ips[ip] = svc.key
        ports = []
        for p in svc.ports:
            np = p.node_port
            if svc.external and np is None:
                np = self._next_node_port(where)
                self.node_ports[np] = svc.key
            ports.append(replace(p, node_port=np if svc.external else None))
        return replace(svc, cluster_ip=ip, ports=tuple(ports))

    def release(self, svc: Service) -> None:
        if svc.cluster_ip:
            self.cluster_ips.pop(svc.cluster_ip, None)
        for p in svc.ports:
            if p.node_port is not None and self.node_ports.get(p.node_port) == svc.key:
                del self.node_ports[p.node_port]

    def _check_ip(self, ip: str, key: str, where: str) -> None:
        addr = IPv4Address(ip)
        if addr not in self.cidr:
            raise SpecError(f"{where}: {ip} is outside network.serviceCIDR {self.cidr}: pick an address "
                            "inside it or leave clusterIP out")
        if addr in (self.cidr.network_address, self.cidr.broadcast_address):
            raise SpecError(f"{where}: {ip} is the network or broadcast address of {self.cidr}: pick another")
        if ip == self.dns_ip and key != DNS_SERVICE:
            raise SpecError(f"{where}: {ip} is reserved for the cluster DNS Service ({DNS_SERVICE}): "
                            "pick another address or leave clusterIP out")
        owner = self.cluster_ips.get(ip)
        if owner is not None and owner != key:
            raise SpecError(f"{where}: {ip} is already the ClusterIP of Service {owner}: pick another "
                            "or leave clusterIP out")

    def _next_ip(self, where: str) -> str:
        base, last = int(self.cidr.network_address), self.cidr.num_addresses - 1
        span = range(FIRST_DYNAMIC_OFFSET, last)
        for k in range(len(span)):
            offset = span[(self._ip_cursor - FIRST_DYNAMIC_OFFSET + k) % len(span)]
            ip = str(IPv4Address(base + offset))
            if ip not in self.cluster_ips and ip != self.dns_ip:
                self._ip_cursor = offset + 1
                return ip
        raise SpecError(f"{where}: network.serviceCIDR {self.cidr} has no free address left: use a larger range")

    def _next_node_port(self, where: str) -> int:
        size = NODE_PORT_MAX - NODE_PORT_MIN + 1
        for k in range(size):
            np = NODE_PORT_MIN + (self._port_cursor - NODE_PORT_MIN + k) % size
            if np not in self.node_ports:
                self._port_cursor = np + 1
                return np
        raise SpecError(f"{where}: no free nodePort left in {NODE_PORT_MIN}-{NODE_PORT_MAX}")


def plan(manifests: Iterable[tuple[str, Any]], allocator: ServiceAllocator) -> list[Service]:
    """Parse and allocate the Services of a cluster file: those asking for a fixed ClusterIP or
    nodePort first, so that a dynamic one never takes an address another Service names."""
    parsed = [(where, parse_service(doc, where)) for where, doc in manifests]
    seen: dict[str, str] = {}
    for where, svc in parsed:
        if svc.key in seen:
            raise SpecError(f"{where}.metadata.name: Service {svc.key} is also defined at {seen[svc.key]}: "
                            "rename one")
        seen[svc.key] = where

    for where, svc in parsed:
        allocator.reserve(svc, where)
    return [allocator.fill(svc, where) for where, svc in parsed]
