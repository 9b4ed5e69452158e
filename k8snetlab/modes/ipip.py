"""``ipip`` (Calico IPIP): the Calico pod layout, and IP-in-IP between nodes.

Pod side: the ``calico`` plugin (``cali*`` veth, ``/32``, gateway ``169.254.1.1`` answered by
proxy ARP, MTU 1480 so that the 20-byte outer header fits a 1500-byte underlay).

Between nodes, ``ipipMode`` decides which packets are encapsulated: ``Always`` (all pod
traffic to other nodes) or ``CrossSubnet`` (only to nodes on another underlay subnet; inside
a subnet packets go plain, host-gw style). Two datapaths do the encapsulation:

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

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import naming
from ..errors import KernelFeatureMissing
from ..netutil import Netns
from ..options import opt
from .base import Mode, uplink

if TYPE_CHECKING:  # pragma: no cover
    from ..cluster import Node

log = logging.getLogger(__name__)


@dataclass
class IpipOptions:
    datapath: str = opt("auto", choices=("auto", "kernel", "ebpf"),
                        help="who encapsulates: the ipip device (kernel) or tc BPF (ebpf)")
    ipip_mode: str = opt("Always", key="ipipMode", choices=("Always", "CrossSubnet"),
                         help="encapsulate all cross-node traffic, or only across subnets")
    mtu: int = opt(1480, min=576, max=9000, help="pod MTU (underlay MTU minus 20)")


class CalicoMode(Mode):
    """Shared by the Calico modes: the calico plugin with host-local on the node's block."""

    def plugins(self, node: "Node") -> list[dict[str, Any]]:
        return [{"type": "calico", "mtu": self.mtu, "ipam": self.host_local(node)}]


class IpipMode(CalicoMode):
    name = "ipip"
    Options = IpipOptions
    tools = ("tc",)

    def __init__(self, cluster: Any, options: IpipOptions):
        super().__init__(cluster, options)
        self._datapath: str | None = None if options.datapath == "auto" else options.datapath
        self._tc: dict[str, Any] = {}

    @property
    def mtu(self) -> int:
        return self.options.mtu

    @property
    def datapath(self) -> str:
        return self._datapath or self.options.datapath

    def prepare(self, first_node: "Node") -> None:
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
            ebpf.compile_object()
            self.cluster.state.mount_bpffs()

    def encapsulates(self, node: "Node", peer: "Node") -> bool:
        return self.options.ipip_mode == "Always" or node.spec.subnet != peer.spec.subnet

    def start_node(self, node: "Node", ns: Netns) -> None:
        super().start_node(node, ns)
        if self.datapath == "kernel":
            ns.add_link(naming.IPIP_DEV, "ipip")
            ns.set_mtu(naming.IPIP_DEV, self.mtu)
            ns.link_up(naming.IPIP_DEV)
        else:
            from ..ebpf import IpipTcDatapath
            tc = IpipTcDatapath(node.name, node.netns, uplink(), str(node.spec.ip),
                                str(self.cluster.state.bpf_dir / node.name))
            tc.attach()
            self._tc[node.name] = tc

    def stop_node(self, node: "Node") -> None:
        tc = self._tc.pop(node.name, None)
        if tc is not None:
            tc.detach()

    def add_peer(self, node: "Node", ns: Netns, peer: "Node") -> None:
        cidr = str(peer.spec.pod_cidr)
        if not self.encapsulates(node, peer):
            ns.add_route(cidr, gateway=str(peer.spec.ip), dev=uplink())
        elif self.datapath == "kernel":
            ns.add_route(cidr, gateway=str(peer.spec.ip), dev=naming.IPIP_DEV, onlink=True)
        else:
            tc = self._tc[node.name]
            tc.add_peer(str(peer.spec.ip))
            tc.set_tunnel(cidr, str(peer.spec.ip))   # the map entry first: no packet leaks out plain
            # mtu: what the node itself sends there must still fit the underlay once wrapped
            ns.add_route(cidr, gateway=self.underlay_next_hop(node, peer), dev=uplink(), mtu=self.mtu)

    def remove_peer(self, node: "Node", ns: Netns, peer: "Node") -> None:
        super().remove_peer(node, ns, peer)
        tc = self._tc.get(node.name)
        if tc is not None:
            tc.del_tunnel(str(peer.spec.pod_cidr))
            tc.del_peer(str(peer.spec.ip))
