"""kube-proxy: the interface every mode implements, the mode registry, and what the modes share.

One :class:`Proxier` runs per node (the add-on makes them). It is handed the whole desired
state, a :class:`~.model.Snapshot`, on every change and periodically (``syncPeriod``), and
makes its node match it: ``sync`` is idempotent and also repairs what was changed by hand,
as kube-proxy's full resync does. A mode is one :class:`Proxier` subclass, declared in the
``k8snetlab.kube_proxy_modes`` entry-point group (:data:`PROXIERS`) and chosen with
``kubeProxy.mode`` in the cluster file.

What every NAT-based mode shares lives here too: which UDP conntrack entries a change makes
stale (:func:`stale_udp_flows`), and ``bridge-nf-call-iptables`` (:meth:`Proxier.bridge_netfilter`).
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .. import naming, proc
from ..errors import NetlinkError
from ..netutil import Netns, get_sysctl, set_sysctl
from ..registry import Registry
from .model import KubeProxyOptions, Service, ServicePort, Snapshot

if TYPE_CHECKING:  # pragma: no cover
    from ..cluster_view import ClusterView
    from ..pod import NodeHost

log = logging.getLogger(__name__)

BRIDGE_NF_SYSCTL = "net.bridge.bridge-nf-call-iptables"
MASQ_MARK = "0x4000"       # kube-proxy's --masquerade-bit 14


class Proxier:
    """One kube-proxy on one node."""

    mode: ClassVar[str]
    tools: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cluster: "ClusterView", node: "NodeHost", options: KubeProxyOptions):
        self.cluster = cluster
        self.node = node
        self.options = options
        self.last: Snapshot | None = None          # what the node was last made to match
        self.full_syncs = 0                        # full syncs so far (rule-writing modes)
        self._last_full = 0.0                      # when the last one ran (time.monotonic)
        self._sysctls: dict[str, str] = {}         # sysctls changed -> old value

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this mode cannot run on this machine (one line naming the fix), else None."""
        missing = [t for t in cls.tools if proc.which(t) is None]
        if missing:
            return str(proc.tool_missing(missing[0]))
        return None

    def start(self) -> None:
        """Node-wide set-up before the first sync."""

    def sync(self, snap: Snapshot) -> None:
        """Make the node match ``snap`` entirely; idempotent."""
        raise NotImplementedError

    def stop(self) -> None:
        """Remove everything this proxier made on the node."""
        self.restore_sysctls()

    # -- helpers for the modes -----------------------------------------------------------------
    @property
    def cluster_cidr(self) -> str:
        return str(self.cluster.spec.network.cluster_cidr)

    def set_sysctl(self, key: str, value: str | int) -> None:
        old = set_sysctl(key, value, self.node.netns, self.node.name)
        self._sysctls.setdefault(key, old)

    def restore_sysctls(self) -> None:
        for key, old in reversed(list(self._sysctls.items())):
            try:
                set_sysctl(key, old, self.node.netns, self.node.name)
            except NetlinkError as e:     # the node may be gone already
                log.debug("restore %s on %s: %s", key, self.node.name, e)
        self._sysctls.clear()

    def bridge_netfilter(self) -> bool:
        """Let bridged pod-to-pod frames pass the node's netfilter hooks; False when this kernel
        has no br_netfilter (same-node replies then skip the un-DNAT).

        Pods on a Linux bridge (``cni0``) talk to each other at L2, so a reply from a same-node
        backend would bypass the node's NAT and arrive from the pod's IP instead of the
        ClusterIP. br_netfilter passes bridged frames through iptables/nftables so conntrack can
        undo the DNAT; the sysctl is per network namespace (kernels >= 5.3), and the old value
        is put back on stop."""
        try:
            get_sysctl(BRIDGE_NF_SYSCTL, self.node.netns, self.node.name)
        except NetlinkError:
            log.warning("%s: this kernel has no br_netfilter (%s missing): replies between pods on "
                        "one bridge bypass NAT; Services work across nodes and with the Calico layout",
                        self.node.name, BRIDGE_NF_SYSCTL)
            return False
        self.set_sysctl(BRIDGE_NF_SYSCTL, 1)
        return True

    def bridge_hairpin(self) -> int:
        """Hairpin mode on every port of the node's pod bridge; return how many ports.

        With br_netfilter, a pod's packet to its own Service is DNATed while still on the
        bridge, and the bridge must then send the frame back out of the port it came in on:
        only a port in hairpin mode allows that (kubelet's ``--hairpin-mode=hairpin-veth``).
        The bridge CNI config asks for ``hairpinMode``; this makes sure of it for every pod,
        whatever plugin wired it. Nothing to do without a bridge (the Calico layout routes)."""
        with Netns(self.node.netns, self.node.name) as ns:
            bridge = ns.index(naming.BRIDGE)
            if bridge is None:
                return 0
            ports = [link["index"] for link in ns.ipr.get_links() if link.get("master") == bridge]
            for index in ports:
                ns.ipr.brport("set", index=index, mode=1)    # IFLA_BRPORT_MODE: hairpin
            return len(ports)

    def synced(self, snap: Snapshot, full: bool) -> None:
        """What every rule-writing mode does once its rules match ``snap``: count a full sync,
        hairpin the bridge ports, drop stale UDP flows, remember ``snap``."""
        if full:
            self._last_full = time.monotonic()
            self.full_syncs += 1
        self.bridge_hairpin()
        self.flush_conntrack(self.last, snap)
        self.last = snap

    def flush_conntrack(self, old: Snapshot | None, new: Snapshot) -> int:
        """Delete the node's conntrack entries that ``stale_udp_flows`` names; return how many
        filters found something."""
        return sum(1 for flt in stale_udp_flows(old, new) if self.delete_udp_flows(flt))

    def delete_udp_flows(self, flt: tuple[str, ...]) -> int:
        """Delete the node's UDP conntrack entries a ``conntrack -D`` filter names (over netlink);
        return how many there were."""
        opts = dict(zip(flt[::2], flt[1::2]))
        port = opts.get("--orig-port-dst")
        with Netns(self.node.netns, self.node.name) as ns:
            return ns.delete_conntrack(socket.IPPROTO_UDP, orig_dst=opts.get("--orig-dst"),
                                       orig_dport=int(port) if port else None, reply_src=opts.get("--reply-src"))


# -- conntrack clean-up --------------------------------------------------------------------------
@dataclass(frozen=True)
class _UdpDest:
    """Where a client addresses a UDP service port, and the endpoints behind it."""
    args: tuple[str, ...]            # conntrack filter for the original destination
    endpoints: frozenset[str]


def _udp_dests(snap: Snapshot | None) -> dict[tuple[str, ...], _UdpDest]:
    out: dict[tuple[str, ...], _UdpDest] = {}
    if snap is None:
        return out
    for svc in snap.services:
        if svc.headless:
            continue
        for port in svc.ports:
            if port.protocol != "UDP":
                continue
            eps = frozenset(e.ip for e, _ in snap.port_endpoints(svc, port))
            for args in _front_doors(svc, port):
                out[args] = _UdpDest(args, eps)
    return out


def _front_doors(svc: Service, port: ServicePort) -> list[tuple[str, ...]]:
    doors = [("--orig-dst", str(svc.cluster_ip), "--orig-port-dst", str(port.port))]
    if svc.load_balancer_ip:
        doors.append(("--orig-dst", svc.load_balancer_ip, "--orig-port-dst", str(port.port)))
    if port.node_port is not None:
        doors.append(("--orig-port-dst", str(port.node_port)))
    return doors


def stale_udp_flows(old: Snapshot | None, new: Snapshot) -> list[tuple[str, ...]]:
    """``conntrack -D -p udp`` filters for entries that point where packets must no longer go:

    - for each UDP service port (ClusterIP, load balancer IP, nodePort), every endpoint that
      left: ``--orig-dst <clusterIP> --orig-port-dst <port> --reply-src <old pod IP>``;
    - a UDP service port that had no endpoint and now has one: every entry to it (created
      while packets were rejected, they would keep black-holing the client).

    A UDP "flow" is only a conntrack entry; while a client keeps sending, the entry lives on
    and keeps pointing at the old pod's IP after that pod is gone (the classic kube-proxy bug).
    :meth:`Proxier.flush_conntrack` deletes these on the node, as kube-proxy does.
    """
    before, after = _udp_dests(old), _udp_dests(new)
    out: list[tuple[str, ...]] = []
    for args, dest in before.items():
        now = after.get(args)
        remaining = now.endpoints if now is not None else frozenset()
        for ip in sorted(dest.endpoints - remaining):
            out.append((*args, "--reply-src", ip))
    for args, dest in after.items():
        prev = before.get(args)
        if dest.endpoints and (prev is None or not prev.endpoints) and old is not None:
            out.append(args)
    return out


# -- the registry ------------------------------------------------------------------------------
PROXIERS: Registry[type[Proxier]] = Registry("kube-proxy mode", "k8snetlab.kube_proxy_modes", base=Proxier)


def available_modes() -> list[str]:
    """Modes that can run here: registered, importable, and ``unavailable()`` is None."""
    return [m for m in PROXIERS.names() if PROXIERS.get(m).unavailable() is None]
