"""``vxlan`` (flannel's VXLAN backend): pods on ``cni0``, nodes joined by a VXLAN overlay.

Pod side: as host-gw, the ``flannel`` plugin delegating to ``bridge`` on the node's pod CIDR,
but with MTU 1450: every packet between nodes gains 50 bytes on the wire (outer IPv4 20,
UDP 8, VXLAN 8, inner Ethernet 14), and a 1500-byte underlay must still carry it unfragmented.

What the node agent sets up per node and per peer: :class:`VxlanMode`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import naming
from ..errors import K8sNetLabError
from ..netutil import Netns
from ..options import opt
from .base import uplink
from .host_gw import FlannelMode, route_check_interval

if TYPE_CHECKING:  # pragma: no cover
    from ..pod import NodeHost

log = logging.getLogger(__name__)

UNDERLAY_MTU = 1500
VXLAN_OVERHEAD = 50            # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
LEASE_FILE = "flannel-lease.json"


@dataclass
class VxlanOptions:
    # the device is flannel.<VNI>: seven digits keep the name within 15 characters
    vni: int = opt(1, key="VNI", min=1, max=9_999_999, help="VXLAN network identifier")
    port: int = opt(8472, key="Port", min=1, max=65535,
                    help="UDP destination port (8472, the Linux default; IANA's is 4789)")
    direct_routing: bool = opt(False, key="DirectRouting",
                               help="route plain to nodes of the same subnet, VXLAN only across")
    route_check_interval: float = route_check_interval()


@dataclass(frozen=True)
class Lease:
    """What a node publishes for the others (flannel's subnet lease with vxlan backend data)."""

    node: str
    public_ip: str            # the node's underlay address: the outer destination
    pod_cidr: str
    vni: int
    vtep_mac: str

    @property
    def vtep_ip(self) -> str:
        """The address of the node's VTEP: the network address of its pod CIDR."""
        return str(ipaddress.IPv4Network(self.pod_cidr).network_address)

    def to_json(self) -> str:
        return json.dumps({"Node": self.node, "PublicIP": self.public_ip, "Subnet": self.pod_cidr,
                           "BackendType": "vxlan",
                           "BackendData": {"VNI": self.vni, "VtepMAC": self.vtep_mac}}, indent=2) + "\n"


class VxlanMode(FlannelMode):
    """flannel VXLAN: bridge + flannel.1 VTEP, neighbour and FDB entries per node.

    Node side, what flanneld's vxlan backend does (its current scheme: no L2/L3-miss callouts to
    the daemon and no multicast learning, so nothing is resolved at packet time):

    - one VTEP per node, ``flannel.1``: VNI 1, UDP destination port 8472 (the Linux default that
      flannel keeps), ``local`` = the node's underlay address, ``dev eth0``, ``nolearning``, MTU
      1450, and the address ``<pod CIDR network>.0/32`` so that what the node itself sends to a
      remote pod has a source address on the pod network;
    - its VTEP MAC published in the node's lease (flannel keeps it in a node annotation,
      ``flannel.alpha.coreos.com/backend-data``; here: ``<node state dir>/flannel-lease.json``);
    - for every other node, from that node's lease, in this order (the route last, or the kernel
      would look for the gateway before it can be resolved):

      1. a permanent neighbour entry on ``flannel.1``: peer VTEP address -> peer VTEP MAC,
      2. a forwarding-database entry on ``flannel.1``: peer VTEP MAC -> ``dst`` peer node address,
      3. the route ``<peer pod CIDR> via <peer pod CIDR>.0 dev flannel.1 onlink``.

    The outer packet is addressed to the peer's node address and routed by the node's own
    routing table, so the overlay works on every underlay: on one L2 segment it goes straight to
    the peer, on a routed underlay it goes through the ToR routers like any other node traffic.

    ``DirectRouting: true`` is flannel's option of the same name: a peer on the node's own
    subnet is routed plain (``via <peer node> dev eth0``, host-gw style) and only peers on other
    subnets get the VXLAN entries, as Calico's ``ipipMode: CrossSubnet`` does for IPIP.
    """

    name = "vxlan"
    Options = VxlanOptions
    pod_mtu = UNDERLAY_MTU - VXLAN_OVERHEAD

    def __init__(self, cluster: Any, options: VxlanOptions):
        super().__init__(cluster, options)
        self._leases: dict[str, Lease] = {}     # node name -> its lease (kept after it leaves)

    @property
    def vtep(self) -> str:
        return naming.check_ifname(f"flannel.{self.options.vni}")

    def direct(self, node: "NodeHost", peer: "NodeHost") -> bool:
        """True when ``peer`` is routed plain (DirectRouting and one subnet)."""
        return self.options.direct_routing and node.spec.subnet == peer.spec.subnet

    # -- node agent -------------------------------------------------------------------------------
    def start_node(self, node: "NodeHost", ns: Netns) -> None:
        super().start_node(node, ns)      # ip_forward, subnet.env with FLANNEL_MTU=1450
        ns.add_link(self.vtep, "vxlan", vxlan_id=self.options.vni, vxlan_port=self.options.port,
                    vxlan_local=str(node.spec.ip), vxlan_link=ns.require_index(uplink()),
                    vxlan_learning=0, mtu=self.mtu)
        info = ns.link(self.vtep)
        if info is None or info["kind"] != "vxlan":
            raise K8sNetLabError(f"node {node.name}: {self.vtep} exists but is not a vxlan device")
        lease = Lease(node.name, str(node.spec.ip), str(node.spec.pod_cidr), self.options.vni, info["mac"])
        ns.ensure_addr(self.vtep, f"{lease.vtep_ip}/32")
        ns.link_up(self.vtep)
        (node.state_dir / LEASE_FILE).write_text(lease.to_json())
        self._leases[node.name] = lease
        log.debug("node %s: %s up, VTEP %s %s", node.name, self.vtep, lease.vtep_ip, lease.vtep_mac)

    def lease(self, node: "NodeHost") -> Lease:
        try:
            return self._leases[node.name]
        except KeyError:
            raise K8sNetLabError(f"node {node.name} has no flannel lease yet (its agent did not start)") from None

    def add_peer(self, node: "NodeHost", ns: Netns, peer: "NodeHost") -> None:
        cidr = str(peer.spec.pod_cidr)
        if self.direct(node, peer):
            ns.add_route(cidr, gateway=str(peer.spec.ip), dev=uplink())
            return
        lease = self.lease(peer)
        ns.set_neigh(self.vtep, lease.vtep_ip, lease.vtep_mac)
        ns.set_fdb(self.vtep, lease.vtep_mac, lease.public_ip)
        ns.add_route(cidr, gateway=lease.vtep_ip, dev=self.vtep, onlink=True)

    def peers_to_repair(self, node: "NodeHost", ns: Netns, peers: list["NodeHost"]) -> list["NodeHost"]:
        """Peers lacking their route, or (tunnelled ones) their neighbour or FDB entry."""
        todo = super().peers_to_repair(node, ns, peers)
        neigh, fdb = ns.neighbours(self.vtep), ns.fdb_entries(self.vtep)
        for peer in peers:
            lease = self._leases.get(peer.name)
            if peer in todo or lease is None or self.direct(node, peer):
                continue
            if (lease.vtep_ip, lease.vtep_mac) not in neigh or (lease.vtep_mac, lease.public_ip) not in fdb:
                todo.append(peer)
        return todo

    def remove_peer(self, node: "NodeHost", ns: Netns, peer: "NodeHost") -> None:
        super().remove_peer(node, ns, peer)     # the route first: nothing new goes to the VTEP
        lease = self._leases.get(peer.name)
        if lease is not None and not self.direct(node, peer):
            ns.del_neigh(self.vtep, lease.vtep_ip)
            ns.del_fdb(self.vtep, lease.vtep_mac, lease.public_ip)
