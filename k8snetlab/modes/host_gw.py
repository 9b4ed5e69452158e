"""``host-gw`` (flannel): pods on ``cni0``; each node routes every other node's pod CIDR
``via`` that node's underlay address. Packets cross the underlay unencapsulated, so every
node must be on one L2 segment (the next hop must be on-link): other layouts are refused,
as flannel refuses them.

The node agent plays flanneld: it writes the node's ``subnet.env`` (which the ``flannel``
CNI plugin reads before delegating to ``bridge``) and keeps one route per other node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import SpecError
from ..netutil import Netns
from ..options import opt
from .base import BATCH_MIN, Mode, uplink

if TYPE_CHECKING:  # pragma: no cover
    from ..pod import NodeHost
    from ..clusterspec import ClusterSpec


def route_check_interval() -> Any:
    """The option field; flanneld's host-gw backend checks its routes every 10 s."""
    return opt(10.0, key="RouteCheckInterval", min=0.1, max=86400,
               help="seconds between the node agent's checks of its routes (VXLAN: and its "
                    "neighbour/FDB entries); what was deleted by hand comes back")


@dataclass
class FlannelOptions:
    route_check_interval: float = route_check_interval()


class FlannelMode(Mode):
    """Shared by flannel's backends: subnet.env + flannel plugin delegating to bridge."""

    network_name = "cbr0"
    Options = FlannelOptions

    @property
    def resync_period(self) -> float | None:
        return self.options.route_check_interval

    def plugin_configs(self, node: "NodeHost") -> list[dict[str, Any]]:
        return [{"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True},
                 "subnetFile": str(node.state_dir / "subnet.env"),
                 "dataDir": str(node.state_dir / "flannel"),
                 "ipamDataDir": str(node.state_dir / "ipam")}]

    def start_node(self, node: "NodeHost", ns: Netns) -> None:
        super().start_node(node, ns)
        net = self.cluster.spec.network
        gw = next(node.spec.pod_cidr.hosts())
        (node.state_dir / "subnet.env").write_text(
            f"FLANNEL_NETWORK={net.cluster_cidr}\n"
            f"FLANNEL_SUBNET={gw}/{node.spec.pod_cidr.prefixlen}\n"
            f"FLANNEL_MTU={self.mtu}\nFLANNEL_IPMASQ=false\n")


class HostGwMode(FlannelMode):
    name = "host-gw"

    @classmethod
    def validate(cls, spec: "ClusterSpec") -> None:
        subnets = {n.subnet for n in spec.nodes}
        if len(subnets) > 1:
            by = {}
            for n in spec.nodes:
                by.setdefault(n.subnet, n.name)
            a, b = list(by.items())[:2]
            raise SpecError(f"{spec.source}: host-gw needs every node on one L2 segment, but {a[1]} is "
                            f"on subnet {a[0]} and {b[1]} on {b[0]}: use vxlan or ipip, or put the "
                            "nodes in one subnet")

    def add_peer(self, node: "NodeHost", ns: Netns, peer: "NodeHost") -> None:
        # the uplink's index, asked once per node (eth0 lives as long as the node): one
        # netlink request per route instead of two, 9,900 routes at 100 nodes
        uplinks = self.__dict__.setdefault("_uplinks", {})
        key = (node.name, node.pid)          # a node that rejoins has a new namespace
        index = uplinks.get(key)
        if index is None:
            index = uplinks[key] = ns.require_index(uplink())
        ns.add_route(str(peer.spec.pod_cidr), gateway=str(peer.spec.ip), dev=index)

    def add_peers(self, node: "NodeHost", ns: Netns, peers: list["NodeHost"]) -> None:
        """Every peer's route in one batch (one ``ip -batch`` per node, not a request per route);
        a few (a node joined) by netlink, cheaper than a program."""
        if len(peers) < BATCH_MIN:
            return super().add_peers(node, ns, peers)
        ns.replace_routes([{"dst": str(p.spec.pod_cidr), "gateway": str(p.spec.ip), "dev": uplink()}
                           for p in peers])
