"""``ipip`` (Calico IPIP): the Calico pod layout, and IP-in-IP between nodes.

Pod side: the ``calico`` plugin (``cali*`` veth, ``/32``, gateway ``169.254.1.1`` answered by
proxy ARP, MTU 1480 so that the 20-byte outer header fits a 1500-byte underlay).

Between nodes, ``ipipMode`` decides which packets are encapsulated: ``Always`` (all pod
traffic to other nodes) or ``CrossSubnet`` (only to nodes on another underlay subnet; inside
a subnet packets go plain, host-gw style). The two datapaths that encapsulate: :class:`IpipMode`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import naming
from ..errors import KernelFeatureMissing
from ..netutil import Netns
from ..options import opt
from .base import BATCH_MIN, Mode, uplink

if TYPE_CHECKING:  # pragma: no cover
    from ..pod import NodeHost

log = logging.getLogger(__name__)


@dataclass
class IpipOptions:
    datapath: str = opt("auto", choices=("auto", "kernel", "ebpf"),
                        help="who encapsulates: the ipip device (kernel) or tc BPF (ebpf)")
    ipip_mode: str = opt("Always", key="ipipMode", choices=("Always", "CrossSubnet"),
                         help="encapsulate all cross-node traffic, or only across subnets")
    mtu: int = opt(1480, min=576, max=9000, help="pod MTU (underlay MTU minus 20)")
    route_refresh_interval: float = opt(90.0, key="routeRefreshInterval", min=0.1, max=86400,
                                        help="seconds between Felix-style refreshes of the routes "
                                             "(ebpf: and BPF maps, programs); what was deleted comes back")


class CalicoMode(Mode):
    """Shared by the Calico modes: the calico plugin with host-local on the node's block."""

    chained = ("bandwidth", "portmap")      # calico's own list: calico, bandwidth, portmap

    def plugin_configs(self, node: "NodeHost") -> list[dict[str, Any]]:
        return [{"type": "calico", "mtu": self.mtu, "ipam": self.host_local(node)}]

    @property
    def resync_period(self) -> float | None:
        return self.options.route_refresh_interval

    def resync_node(self, node: "NodeHost", ns: Netns, peers: list["NodeHost"]) -> list[str]:
        """Felix's route refresh: the peers' routes, and the ``/32`` route of each local pod
        on its ``cali*`` veth (what the calico plugin made at ADD)."""
        fixed = super().resync_node(node, ns, peers)
        have = {(r["dst"], r["dev"]) for r in ns.routes()}
        for pod in list(self.cluster.pods.values()):
            if pod.node_name != node.name or pod.result is None or not pod.ip:
                continue
            cali = naming.host_veth("cali", pod.container_id, naming.POD_IFNAME)
            if (f"{pod.ip}/32", cali) not in have and ns.index(cali) is not None:
                ns.add_route(f"{pod.ip}/32", dev=cali)
                fixed.append(pod.name)
        return fixed


class IpipMode(CalicoMode):
    """Calico IPIP; the two datapaths that encapsulate:

    - ``kernel``: Calico's own, the ``tunl0`` ipip device and routes
      ``<pod CIDR> via <node IP> dev tunl0 onlink``. Needs the kernel's ipip support.
    - ``ebpf``: tc BPF programs on the node's ``eth0`` (``k8snetlab/bpf/ipip_tc.c``). Routes go
      ``via`` the underlay next hop on ``eth0``, and the egress program wraps packets for remote
      pod CIDRs (an LPM map: CIDR -> remote node) in an outer IPv4 header, protocol 4; the ingress
      program strips it from packets sent by known nodes. Same bytes on the wire as ``tunl0``.

    With ``CrossSubnet`` only peers on another subnet are tunnelled: only they get a tunnel-map
    and a peer-map entry (ebpf) or a ``tunl0`` route (kernel); a peer on the node's own subnet
    gets the plain route ``<pod CIDR> via <node IP> dev eth0``. On a routed underlay the
    ebpf route to a tunnelled CIDR goes ``via`` the node's gateway (its ToR router, see
    ``Mode.underlay_next_hop``) while the outer header names the peer node itself, so the
    routers forward an ordinary node-to-node packet. The pod MTU stays 1480 in both modes, as
    Calico keeps it: a pod cannot know which peers its packets will be wrapped for.

    ``datapath: auto`` probes the kernel in the first node's namespace and picks ``kernel`` if it
    has ipip, otherwise ``ebpf``, and logs which.
    """
    name = "ipip"
    Options = IpipOptions
    tools = ("tc",)
    parallel_node_start = True      # ebpf: bpftool and tc per node; each node its own pins and maps

    def __init__(self, cluster: Any, options: IpipOptions):
        super().__init__(cluster, options)
        self._datapath: str | None = None if options.datapath == "auto" else options.datapath
        self._tc: dict[str, Any] = {}          # node -> its attached IpipTcDatapath
        self._idle_tc: dict[str, Any] = {}     # node -> one not attached yet (CrossSubnet)
        self._obj: Any = None                  # the compiled BPF object (ebpf), once per cluster

    @property
    def mtu(self) -> int:
        return self.options.mtu

    @property
    def datapath(self) -> str:
        return self._datapath or self.options.datapath

    def prepare(self, first_node: "NodeHost") -> None:
        """Resolve ``auto`` and check that the chosen datapath can run here."""
        from .. import ebpf, proc
        has_ipip = ebpf.kernel_has_ipip(first_node.netns)
        if self.options.datapath == "auto":
            self._datapath = "kernel" if has_ipip else "ebpf"
            log.info("ipip datapath: %s (%s)", self._datapath,
                     "kernel has ipip" if has_ipip else "kernel has no ipip device: tc BPF encapsulation")
        elif self.options.datapath == "kernel" and not has_ipip:
            raise KernelFeatureMissing(f"{self.cluster.spec.source}: cni.ipip.datapath: kernel needs the "
                                       "kernel's ipip device (tunl0), which this kernel lacks (Unknown "
                                       "device type): use datapath: ebpf or auto")
        if self._datapath == "ebpf":
            proc.require("clang", "bpftool", "tc")
            # once: finding the cached object runs clang twice (its version, its target), which
            # per node was most of an ipip node agent's start (~0.1 s of CPU each, 200 nodes)
            self._obj = ebpf.compile_object()
            self.cluster.state.mount_bpffs()

    def encapsulates(self, node: "NodeHost", peer: "NodeHost") -> bool:
        return self.options.ipip_mode == "Always" or node.spec.subnet != peer.spec.subnet

    def start_node(self, node: "NodeHost", ns: Netns) -> None:
        super().start_node(node, ns)
        if self.datapath == "kernel":
            ns.add_link(naming.IPIP_DEV, "ipip")
            ns.set_mtu(naming.IPIP_DEV, self.mtu)
            ns.link_up(naming.IPIP_DEV)
        else:
            from ..ebpf import IpipTcDatapath
            self._idle_tc[node.name] = IpipTcDatapath(node.name, node.netns, uplink(), str(node.spec.ip),
                                                      str(self.cluster.state.bpf_dir / node.name), obj=self._obj)
            if self.options.ipip_mode == "Always":
                self._hooked(node)

    def _hooked(self, node: "NodeHost") -> Any:
        """The node's tc programs, attached when the first peer needs a tunnel. With
        ``CrossSubnet`` inside one subnet none ever does, and the node's packets then meet no
        program at all: a same-subnet packet does not touch Calico's ``tunl0`` either."""
        tc = self._tc.get(node.name)
        if tc is None:
            tc = self._idle_tc.pop(node.name)
            tc.attach()
            self._tc[node.name] = tc
        return tc

    def stop_node(self, node: "NodeHost") -> None:
        self._idle_tc.pop(node.name, None)
        tc = self._tc.pop(node.name, None)
        if tc is not None:
            tc.detach()

    def add_peer(self, node: "NodeHost", ns: Netns, peer: "NodeHost") -> None:
        cidr = str(peer.spec.pod_cidr)
        if not self.encapsulates(node, peer):
            ns.add_route(cidr, gateway=str(peer.spec.ip), dev=uplink())
        elif self.datapath == "kernel":
            ns.add_route(cidr, gateway=str(peer.spec.ip), dev=naming.IPIP_DEV, onlink=True)
        else:
            tc = self._hooked(node)
            tc.add_peer(str(peer.spec.ip))
            tc.set_tunnel(cidr, str(peer.spec.ip))   # the map entry first: no packet leaks out plain
            # mtu: what the node itself sends there must still fit the underlay once wrapped
            ns.add_route(cidr, gateway=self.underlay_next_hop(node, peer), dev=uplink(), mtu=self.mtu)

    def add_peers(self, node: "NodeHost", ns: Netns, peers: list["NodeHost"]) -> None:
        """What ``add_peer`` does, the routes of all peers in one batch (the BPF map entries
        are syscalls already, and go first: no packet leaks out plain); a few by netlink."""
        if len(peers) < BATCH_MIN:
            return super().add_peers(node, ns, peers)
        routes = []
        for peer in peers:
            cidr, ip = str(peer.spec.pod_cidr), str(peer.spec.ip)
            if not self.encapsulates(node, peer):
                routes.append({"dst": cidr, "gateway": ip, "dev": uplink()})
            elif self.datapath == "kernel":
                routes.append({"dst": cidr, "gateway": ip, "dev": naming.IPIP_DEV, "onlink": True})
            else:
                tc = self._hooked(node)
                tc.add_peer(ip)
                tc.set_tunnel(cidr, ip)
                routes.append({"dst": cidr, "gateway": self.underlay_next_hop(node, peer), "dev": uplink(),
                               "mtu": self.mtu})
        ns.replace_routes(routes)

    def bpf_datapath(self, node: str) -> Any:
        """The node's eBPF IPIP datapath (its maps and counters), None on the kernel datapath."""
        return self._tc.get(node)

    def resync_node(self, node: "NodeHost", ns: Netns, peers: list["NodeHost"]) -> list[str]:
        """ebpf: the programs first (a re-attach starts with empty maps, so every peer is then
        repaired), then routes, map entries and pod routes."""
        tc = self._tc.get(node.name)
        if tc is not None and not tc.attached():
            log.info("node %s: eBPF IPIP programs gone from %s, attaching them again", node.name, uplink())
            tc.attach()
        return super().resync_node(node, ns, peers)

    def peers_to_repair(self, node: "NodeHost", ns: Netns, peers: list["NodeHost"]) -> list["NodeHost"]:
        """Peers lacking their route or, in the ebpf datapath, their tunnel or peer map entry."""
        todo = super().peers_to_repair(node, ns, peers)
        tc = self._tc.get(node.name)
        if tc is None:
            return todo
        tunnels, known = tc.tunnels(), tc.peers()
        for peer in peers:
            if peer in todo or not self.encapsulates(node, peer):
                continue
            if tunnels.get(str(peer.spec.pod_cidr)) != str(peer.spec.ip) or str(peer.spec.ip) not in known:
                todo.append(peer)
        return todo

    def remove_peer(self, node: "NodeHost", ns: Netns, peer: "NodeHost") -> None:
        super().remove_peer(node, ns, peer)
        tc = self._tc.get(node.name)
        if tc is not None:
            tc.del_tunnel(str(peer.spec.pod_cidr))
            tc.del_peer(str(peer.spec.ip))
