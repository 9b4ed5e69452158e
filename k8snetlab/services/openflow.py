"""kube-proxy ``openflow`` mode: no rules in the nodes; the underlay's OpenFlow switch balances.

With ``kubeProxy: {mode: openflow}`` and ``underlay: {switch: ovs, controller: service_lb}`` the
ClusterIP Services are served by the ``service_lb`` controller app (``controllers/service_lb.py``),
the way OVS-based CNIs replace kube-proxy. This proxier is the runtime's half: on every sync
it writes the desired state the app needs to a JSON file in the cluster's Open vSwitch run
directory (the app re-reads it when it changes; what it holds: :class:`OpenFlowProxier`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .. import naming
from ..errors import K8sNetLabError, SpecError
from ..netutil import Netns
from .model import Snapshot
from .proxy import Proxier

if TYPE_CHECKING:  # pragma: no cover
    from ..cluster_view import ClusterView

log = logging.getLogger(__name__)

SERVICES_FILE = "services.json"    # in the OVS run dir; the controller gets its path in $K8SNETLAB_SERVICES


def services_file(cluster: "ClusterView") -> Path:
    return cluster.ovs.run_dir / SERVICES_FILE


def render(cluster: "ClusterView", snap: Snapshot, macs: dict[str, str]) -> dict:
    """What the service_lb app serves (pure: unit-tested with a stand-in cluster)."""
    nodes = {n.name: {"ip": str(n.spec.ip), "mac": macs.get(n.name, ""), "pod_cidr": str(n.spec.pod_cidr)}
             for n in cluster.nodes.values()}
    services = []
    for svc in snap.services:
        if svc.headless or not svc.cluster_ip:
            continue
        for port in svc.ports:
            services.append({
                "key": f"{svc.key}:{port.name}" if port.name else svc.key,
                "ip": svc.cluster_ip, "protocol": port.protocol, "port": port.port,
                "affinity": svc.session_affinity,
                "backends": [{"ip": e.ip, "port": p, "node": e.node, "pod": e.pod}
                             for e, p in snap.port_endpoints(svc, port)],
            })
    return {"service_cidr": str(cluster.spec.network.service_cidr), "nodes": nodes, "services": services}


class OpenFlowProxier(Proxier):
    """What the service_lb app needs, written on every sync:

    - the service CIDR (the app answers ARP for it and sends its packets to the controller);
    - the nodes: IP, ``eth0`` MAC and pod CIDR (to send a connection to its backend's node and to
      tell whether a client and its backend share a node, which needs source NAT);
    - every ClusterIP port with its ready backends (pod IP, resolved target port, node).

    The nodes themselves are not touched: no iptables, no sysctls. nodePorts and load balancer IPs
    are not served in this mode (logged once); use iptables or nftables for them. Requirements
    (checked when the cluster file loads, see :func:`k8snetlab.switching.check`): the OVS underlay
    with ``controller: service_lb``, one subnet and ``cni.type: host-gw`` (pod packets cross the
    underlay unencapsulated, so the switch can rewrite them).
    """
    mode = "openflow"
    tools = ()

    def start(self) -> None:
        ovs = getattr(self.cluster, "ovs", None)
        if ovs is None or ovs.app != "service_lb":
            raise SpecError(f"{self.cluster.spec.source}: kubeProxy.mode openflow needs underlay: "
                            "{switch: ovs, controller: service_lb}")
        self._warned = False
        self._mac_cache: dict[str, str] = {}

    def sync(self, snap: Snapshot) -> None:
        if not self._warned and any(s.external for s in snap.services):
            log.warning("kube-proxy openflow serves ClusterIPs only: nodePorts and load balancer IPs of %s "
                        "are not programmed", ", ".join(s.key for s in snap.services if s.external))
            self._warned = True
        path = services_file(self.cluster)
        text = json.dumps(render(self.cluster, snap, self._macs()), indent=1, sort_keys=True)
        try:
            if path.read_text() == text:
                self.last = snap
                return
        except OSError:
            pass
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)       # atomic: the app never reads half a file
        self.last = snap

    def _macs(self) -> dict[str, str]:
        """The nodes' eth0 MACs (read once per node: they do not change)."""
        for name, node in self.cluster.nodes.items():
            if name not in self._mac_cache:
                self._mac_cache[name] = _mac(node)
        return {n: m for n, m in self._mac_cache.items() if n in self.cluster.nodes}

    def stop(self) -> None:
        """Nothing in the node to undo; the file goes with the cluster's state directory."""


def _mac(node) -> str:
    """The MAC of the node's underlay interface."""
    with Netns(node.netns, node.name) as ns:
        link = ns.link(naming.NODE_UPLINK)
    if link is None or not link["mac"]:
        raise K8sNetLabError(f"{node.name} has no {naming.NODE_UPLINK} to serve Services from")
    return link["mac"]
