"""An emulated cloud load balancer for ``type: LoadBalancer`` Services.

In a cloud, the cloud controller gives a LoadBalancer Service an external IP and programs the
provider's load balancer to spread connections over the nodePorts of the cluster's nodes. Here
that load balancer is a host ``lb`` on the underlay (``cluster.add_host``), outside the
cluster, built from plain Linux parts:

Addresses, spreading and replies: :class:`LoadBalancer`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import naming
from ..errors import K8sNetLabError
from ..netutil import Netns
from .model import Snapshot

if TYPE_CHECKING:  # pragma: no cover
    from ..pod import NetnsHost

log = logging.getLogger(__name__)

HOST = "lb"
SERVICES_CHAIN = "LB-SERVICES"
POSTROUTING_CHAIN = "LB-POSTROUTING"


@dataclass(frozen=True)
class Forward:
    """One Service port on the load balancer: where clients connect, where it sends them."""
    service: str                                # "ns/name"
    comment: str                                # "ns/name:port"
    ip: str                                     # external IP
    protocol: str
    port: int
    targets: tuple[tuple[str, int], ...]        # (node IP, nodePort), in node order

    @property
    def chain(self) -> str:
        """``LB-`` + 16 characters of base32(sha256), as kube-proxy names its chains."""
        digest = hashlib.sha256(f"{self.comment}/{self.protocol}:{self.ip}".encode()).digest()
        return "LB-" + base64.b32encode(digest).decode()[:16]


def pool_addresses(pool: str, subnets: list[ipaddress.IPv4Network]) -> list[str]:
    """The usable addresses of the pool: inside it, not a network or broadcast address of the
    underlay subnet holding it."""
    net = ipaddress.IPv4Network(pool)
    holder = next((s for s in subnets if net.subnet_of(s)), None)
    bad = {holder.network_address, holder.broadcast_address} if holder else set()
    return [str(a) for a in net if a not in bad]


def plan(snap: Snapshot, node_ips: dict[str, str]) -> list[Forward]:
    """What the load balancer forwards for a snapshot (pure: unit-tested). ``node_ips``: node
    name -> address, in the order connections are spread."""
    out = []
    for svc in snap.services:
        if svc.type != "LoadBalancer" or not svc.load_balancer_ip:
            continue
        for port in svc.ports:
            if port.node_port is None:
                continue
            if svc.external_traffic_policy == "Local":
                with_endpoint = {e.node for e, _ in snap.port_endpoints(svc, port)}
                nodes = [n for n in node_ips if n in with_endpoint]
            else:
                nodes = list(node_ips)
            out.append(Forward(svc.key, svc.port_name(port), svc.load_balancer_ip, port.protocol, port.port,
                               tuple((node_ips[n], port.node_port) for n in nodes)))
    return out


def render(forwards: list[Forward], own_ip: str) -> str:
    """The whole ``nat`` table of the ``lb`` namespace (``iptables-restore`` input)."""
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":POSTROUTING ACCEPT [0:0]", f":{SERVICES_CHAIN} - [0:0]", f":{POSTROUTING_CHAIN} - [0:0]"]
    lines += [f":{f.chain} - [0:0]" for f in forwards if f.targets]
    lines += [f'-A PREROUTING -m comment --comment "load balancer front ends" -j {SERVICES_CHAIN}',
              f'-A OUTPUT -m comment --comment "load balancer front ends" -j {SERVICES_CHAIN}',
              f'-A POSTROUTING -m comment --comment "replies come back through the load balancer" '
              f'-j {POSTROUTING_CHAIN}']
    for f in forwards:
        if not f.targets:
            continue
        p = f.protocol.lower()
        lines.append(f'-A {SERVICES_CHAIN} -d {f.ip}/32 -p {p} -m comment --comment "{f.comment}" '
                     f'-m {p} --dport {f.port} -j {f.chain}')
        n = len(f.targets)
        for i, (ip, port) in enumerate(f.targets):
            every = f"-m statistic --mode nth --every {n - i} --packet 0 " if i < n - 1 else ""
            lines.append(f"-A {f.chain} -p {p} {every}-j DNAT --to-destination {ip}:{port}")
    lines.append(f"-A {POSTROUTING_CHAIN} -m conntrack --ctstate DNAT -j SNAT --to-source {own_ip}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class LoadBalancer:
    """The ``lb`` host and the external IPs of LoadBalancer Services (driven by the add-on).

    - **addresses**: Services get external IPs from ``kubeProxy.loadBalancerPool`` (default: the
      last /28 of the first node subnet). The pool's first address is the ``lb`` host's own; each
      assigned one is added to ``lb``'s ``eth0`` as a ``/32``, so ``lb`` answers ARP for it and
      the ``external`` client host (or anything routed to that subnet) reaches it.
    - **spreading**: one ``nat`` rule set in ``lb``'s namespace per Service port: ``LB-SERVICES``
      matches ``<external IP>:<port>`` and jumps to a per-port chain that DNATs new connections to
      ``<node IP>:<nodePort>``, round robin over the nodes (``statistic --mode nth``). With
      ``externalTrafficPolicy: Cluster`` every node is a target; with ``Local`` only nodes that
      have a ready endpoint of the Service, which is what a cloud load balancer learns from its
      health check of the Service's ``healthCheckNodePort`` (here read from the same snapshot the
      proxies get, not probed). A Service port without targets has no rule: a connection reaches
      ``lb`` itself and is refused.
    - **replies**: ``LB-POSTROUTING`` SNATs the forwarded connections to ``lb``'s own address, so
      a node answers ``lb`` and ``lb`` undoes both translations on the way back to the client (a
      cloud load balancer in proxy mode does the same; direct server return would need the node to
      own the external IP). Hence the source a backend sees: in iptables/nftables mode, with
      ``Cluster`` the node's address (kube-proxy masquerades), with ``Local`` the **``lb``'s
      address** (kube-proxy keeps the source, which is ``lb`` after its SNAT); in userspace mode
      always the node's address.

    ``sync(snap)`` rewrites the whole ``nat`` table of ``lb`` in one ``iptables-restore`` (the
    namespace is ours alone) and adds or removes the external addresses. ``assign(key)`` is what the
    Service controller calls when a LoadBalancer Service is created; it needs no running host.
    """

    def __init__(self, addon: Any):
        self.addon = addon
        self.cluster = addon.cluster
        pool = getattr(getattr(addon, "options", None), "load_balancer_pool", None)
        subnets = [s.cidr for s in self.cluster.spec.underlay.subnets]
        addrs = pool_addresses(pool, subnets) if pool else []
        self.pool = pool
        self.own_ip: str | None = addrs[0] if addrs else None
        self.free = addrs[1:]                    # in order: the same file gives the same IPs
        self.assigned: dict[str, str] = {}       # service key -> external IP
        self.host: "NetnsHost | None" = None
        self._addresses: set[str] = set()        # external IPs on lb's eth0
        self._lock = threading.Lock()

    # -- addresses -------------------------------------------------------------------------
    def assign(self, service_key: str) -> str:
        """The external IP of a LoadBalancer Service (the same one on every call)."""
        with self._lock:
            if service_key in self.assigned:
                return self.assigned[service_key]
            if self.pool is None:
                raise K8sNetLabError(f"Service {service_key}: no kubeProxy.loadBalancerPool (the first node "
                                     "subnet is too small for the default /28): set one in the cluster file")
            if not self.free:
                raise K8sNetLabError(f"Service {service_key}: kubeProxy.loadBalancerPool {self.pool} is exhausted "
                                     f"({len(self.assigned)} Services hold its addresses): give a larger CIDR")
            ip = self.free.pop(0)
            self.assigned[service_key] = ip
            return ip

    def release(self, service_key: str) -> None:
        with self._lock:
            ip = self.assigned.pop(service_key, None)
            if ip is not None:
                self.free.insert(0, ip)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self.own_ip is None:
            log.info("no load balancer: kubeProxy.loadBalancerPool is not set and the first node "
                     "subnet has no room for the default")
            return
        self.host = self.cluster.add_host(HOST, self.own_ip)
        with Netns(self.host.netns, HOST) as ns:
            ns.set_sysctl("net.ipv4.ip_forward", 1)
            for scope in ("all", naming.NODE_UPLINK):
                # it forwards out of the interface a packet came in on: no ICMP redirects
                ns.set_sysctl(f"net.ipv4.conf.{scope}.send_redirects", 0)
        log.info("load balancer %s at %s, pool %s", HOST, self.own_ip, self.pool)
        self.sync(self.addon.snapshot())

    def stop(self) -> None:
        """The host goes with the cluster's other underlay hosts; only the books are cleared."""
        self._addresses.clear()

    def sync(self, snap: Snapshot) -> None:
        with self._lock:
            live = {s.key for s in snap.services if s.type == "LoadBalancer"}
            for key in [k for k in self.assigned if k not in live]:
                self.free.insert(0, self.assigned.pop(key))
        if self.host is None:
            return
        node_ips = {name: node.ip for name, node in self.cluster.nodes.items()}
        forwards = plan(snap, node_ips)
        self._set_addresses({f.ip for f in forwards} | set(self.assigned.values()))
        self.host.run(["iptables-restore", "-w"], input=render(forwards, self.own_ip))

    def _set_addresses(self, want: set[str]) -> None:
        assert self.host is not None
        with Netns(self.host.netns, HOST) as ns:
            for ip in sorted(want - self._addresses):
                ns.ensure_addr(naming.NODE_UPLINK, f"{ip}/32")
            for ip in sorted(self._addresses - want):
                ns.del_addr(naming.NODE_UPLINK, f"{ip}/32")
        self._addresses = set(want)
