"""The interface every CNI mode implements, and the node agent's shared parts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .. import chain, naming
from ..cni import SPEC_VERSION, NetworkConfigList
from ..errors import ToolMissing
from ..netutil import Netns

if TYPE_CHECKING:  # pragma: no cover
    from ..cluster_view import ClusterView
    from ..pod import NodeHost
    from ..clusterspec import ClusterSpec

log = logging.getLogger(__name__)

REFERENCE_DIR = "/usr/lib/cni"      # Debian's containernetworking-plugins
REFERENCE_VERSION = "1.0.0"         # the newest CNI version containernetworking-plugins 1.1 speaks


@dataclass
class NoOptions:
    pass


# peers at which a node agent's routes go in one ``ip -batch`` (one program) rather than one
# pyroute2 request each (~1 ms of CPU per request, a few ms per program)
BATCH_MIN = 8


class Mode:
    """One CNI mode. The class is chosen by name; one instance serves one cluster."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    tools: ClassVar[tuple[str, ...]] = ()      # programs the mode needs (checked before start)
    network_name: ClassVar[str] = "k8s-pod-network"
    # may start_node run for several nodes at once (threads)? For agents that mostly wait
    # for programs (tc, bpftool): their start then spreads over the CPUs
    parallel_node_start: ClassVar[bool] = False
    pod_mtu: ClassVar[int] = 1500
    # the chained plugins after the mode's own, as the real CNI's config list has them
    # (``cni.chain`` in a cluster file replaces it)
    chained: ClassVar[tuple[str, ...]] = ("portmap",)
    publishes_host_ports: ClassVar[bool] = False     # the mode does hostPorts itself (docker)

    def __init__(self, cluster: "ClusterView", options: Any):
        self.cluster = cluster
        self.options = options

    # -- description (no root needed) ---------------------------------------------------------
    @classmethod
    def validate(cls, spec: "ClusterSpec") -> None:
        """Refuse a cluster this mode cannot wire (raise SpecError naming the fix)."""

    @property
    def datapath(self) -> str:
        return "kernel"

    @property
    def mtu(self) -> int:
        return self.pod_mtu

    def plugin_configs(self, node: "NodeHost") -> list[dict[str, Any]]:
        """The plugin configs of the node's network config list, in order (``type`` first)."""
        raise NotImplementedError

    def chained_configs(self, node: "NodeHost") -> list[dict[str, Any]]:
        """The chained plugins' configs (``portmap``, ``bandwidth``, ``tuning``) after the mode's."""
        cni = self.cluster.spec.cni
        names = self.chained if cni.chain is None else cni.chain
        confs = chain.chained_configs(names, cni.chain_sysctl)
        for c in confs:
            if c["type"] == "tuning":
                c["dataDir"] = str(node.state_dir / "tuning")
        return confs

    def config_list(self, node: "NodeHost") -> list[dict[str, Any]]:
        """Every plugin config of the node's list, in order: the mode's, then the chained."""
        return self.plugin_configs(node) + self.chained_configs(node)

    def netconf(self, node: "NodeHost") -> NetworkConfigList:
        """The node's network config list, as a kubelet finds it in /etc/cni/net.d. With
        ``cni.chain.reference`` the chained plugins are Debian's binaries: a directory of links
        to them comes first in CNI_PATH, and the list speaks their CNI version."""
        bins = str(self.cluster.state.cni_bin)
        if not self.cluster.spec.cni.chain_reference:
            return NetworkConfigList(self.network_name, SPEC_VERSION, self.config_list(node), bin_dirs=(bins,))
        return NetworkConfigList(self.network_name, REFERENCE_VERSION, self.config_list(node),
                                 bin_dirs=(str(self.reference_chain_dir()), bins))

    def reference_chain_dir(self) -> Path:
        """``<cni dir>/bin-reference``: links to the reference tuning, bandwidth and portmap."""
        d = Path(self.cluster.state.cni_bin).parent / "bin-reference"
        d.mkdir(parents=True, exist_ok=True)
        for name in chain.CHAINED:
            target = Path(REFERENCE_DIR) / name
            if not os.access(target, os.X_OK):
                raise ToolMissing(str(target), "containernetworking-plugins", "Debian")
            try:
                (d / name).symlink_to(target)
            except FileExistsError:
                pass
        return d

    def host_local(self, node: "NodeHost", **extra: Any) -> dict[str, Any]:
        """host-local IPAM on the node's pod CIDR, state in the node's own directory."""
        return {"type": "host-local", "ranges": [[{"subnet": str(node.spec.pod_cidr)}]],
                "dataDir": str(node.state_dir / "ipam"), **extra}

    # -- node agent ------------------------------------------------------------------------------
    def prepare(self, first_node: "NodeHost") -> None:
        """Once per cluster, after the nodes exist and before any node agent starts."""

    def start_node(self, node: "NodeHost", ns: Netns) -> None:
        """Node-wide set-up before any pod (sysctls, devices, programs)."""
        ns.set_sysctl("net.ipv4.ip_forward", 1)

    def pod_added(self, pod: Any) -> None:
        """After CNI ADD of a pod, before its containers start (port mappings...)."""

    def pod_removed(self, pod: Any) -> None:
        """Before CNI DEL of a pod."""

    def stop_all(self) -> None:
        """A cluster's teardown, before every node's stop_node: end at once what the nodes
        run (daemons that take seconds each to stop)."""

    def stop_node(self, node: "NodeHost") -> None:
        """Undo what start_node made outside the node's namespace (BPF pins...)."""

    def add_peer(self, node: "NodeHost", ns: Netns, peer: "NodeHost") -> None:
        """Make ``node`` reach ``peer``'s pod CIDR (called for every other node)."""

    def add_peers(self, node: "NodeHost", ns: Netns, peers: list["NodeHost"]) -> None:
        """``add_peer`` for several peers at once (modes with routes batch them per node)."""
        for peer in peers:
            self.add_peer(node, ns, peer)

    def remove_peer(self, node: "NodeHost", ns: Netns, peer: "NodeHost") -> None:
        ns.del_route(str(peer.spec.pod_cidr))

    # -- the node agent's periodic reconcile (see modes/resync.py) -----------------------------
    @property
    def resync_period(self) -> float | None:
        """Seconds between the node agents' reconcile rounds; None: the mode keeps nothing
        between nodes that could be deleted by hand."""
        return None

    def resync_node(self, node: "NodeHost", ns: Netns, peers: list["NodeHost"]) -> list[str]:
        """One reconcile of ``node``: ``add_peer`` again for every peer that lacks something;
        return the names of those peers."""
        todo = self.peers_to_repair(node, ns, peers)
        if todo:
            self.add_peers(node, ns, todo)
        return [p.name for p in todo]

    def peers_to_repair(self, node: "NodeHost", ns: Netns, peers: list["NodeHost"]) -> list["NodeHost"]:
        """The peers whose pod CIDR has no route on ``node`` (one route dump)."""
        have = ns.route_dsts()
        return [p for p in peers if str(p.spec.pod_cidr) not in have]

    def underlay_next_hop(self, node: "NodeHost", peer: "NodeHost") -> str:
        """The underlay address ``node`` sends to, to reach ``peer``'s node address."""
        if node.spec.subnet == peer.spec.subnet:
            return str(peer.spec.ip)
        gw = self.cluster.spec.underlay.subnet(node.spec.subnet).gateway
        if gw is None:
            raise RuntimeError(f"subnet {node.spec.subnet} has no gateway to reach {peer.name}")
        return str(gw)


def uplink() -> str:
    return naming.NODE_UPLINK
