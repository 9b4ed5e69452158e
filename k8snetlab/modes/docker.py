"""``docker``: the default Docker network on every node, the baseline Kubernetes rejects.

What ``dockerd`` sets up on each host, reproduced on each node: :class:`DockerMode`.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from .. import proc
from ..errors import K8sNetLabError, SpecError
from ..netutil import Netns
from .base import Mode

if TYPE_CHECKING:  # pragma: no cover
    from ..pod import NodeHost
    from ..clusterspec import ClusterSpec

DOCKER_BRIDGE = "docker0"
DOCKER_SUBNET = ipaddress.IPv4Network("172.17.0.0/16")
DOCKER_GATEWAY = "172.17.0.1"


def _nat_rules(subnet: str = str(DOCKER_SUBNET)) -> str:
    """dockerd's nat table at start (iptables-restore input)."""
    return ("*nat\n"
            ":DOCKER - [0:0]\n"
            "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n"
            "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER\n"
            f"-A POSTROUTING -s {subnet} ! -o {DOCKER_BRIDGE} -j MASQUERADE\n"
            f"-A DOCKER -i {DOCKER_BRIDGE} -j RETURN\n"
            "COMMIT\n")


def publish_rules(ip: str, proto: str, host_port: int, container_port: int) -> list[list[str]]:
    """The two rules ``docker run -p host_port:container_port`` adds (without -A/-D)."""
    p = proto.lower()
    return [["-t", "nat", "DOCKER", "!", "-i", DOCKER_BRIDGE, "-p", p, "-m", p, "--dport", str(host_port),
             "-j", "DNAT", "--to-destination", f"{ip}:{container_port}"],
            ["-t", "nat", "POSTROUTING", "-s", f"{ip}/32", "-d", f"{ip}/32", "-p", p, "-m", p,
             "--dport", str(container_port), "-j", "MASQUERADE"]]


class DockerMode(Mode):
    """What ``dockerd`` sets up on each host, reproduced on each node:

    - ``docker0``, a Linux bridge holding 172.17.0.1/16; every container gets a veth on it and an
      address from 172.17.0.0/16, allocated per host, so the first container on *every* node is
      172.17.0.2;
    - ``-t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE``: whatever leaves the
      node carries the node's address;
    - port publishing (``docker run -p HOST:CONTAINER``, here a container port's ``hostPort``):
      ``-t nat -A DOCKER ! -i docker0 -p tcp --dport HOST -j DNAT --to-destination IP:CONTAINER``,
      the only way in from outside the node.

    Nothing routes between nodes' container networks: they are one and the same range on every
    node. A container reaches a container of another node only through a published port, and that
    one sees the first node's address as the source. ``k8snetlab check-model`` shows exactly that.
    Pods are wired with our CNI ``bridge`` plugin (same veth and bridge layout as Docker's).
    """
    name = "docker"
    network_name = "bridge"        # Docker's name for its default network
    tools = ("iptables", "iptables-restore")
    chained = ()                     # dockerd publishes ports itself (below); no chained plugins
    publishes_host_ports = True

    def __init__(self, cluster: Any, options: Any):
        super().__init__(cluster, options)
        self._published: dict[tuple[str, int, str], tuple[str, int]] = {}  # (node, hostPort, proto) -> (pod, port)

    @classmethod
    def validate(cls, spec: "ClusterSpec") -> None:
        for s in spec.underlay.subnets:
            if s.cidr.overlaps(DOCKER_SUBNET):
                raise SpecError(f"{spec.source}: underlay subnet {s.name} ({s.cidr}) overlaps Docker's "
                                f"{DOCKER_SUBNET}: move the underlay for cni docker")
        if spec.network.service_cidr.overlaps(DOCKER_SUBNET):
            raise SpecError(f"{spec.source}: network.serviceCIDR overlaps Docker's {DOCKER_SUBNET}")

    def plugin_configs(self, node: "NodeHost") -> list[dict[str, Any]]:
        ipam = {"type": "host-local", "ranges": [[{"subnet": str(DOCKER_SUBNET), "gateway": DOCKER_GATEWAY}]],
                "dataDir": str(node.state_dir / "ipam")}
        return [{"type": "bridge", "bridge": DOCKER_BRIDGE, "isGateway": True, "isDefaultGateway": True,
                 "hairpinMode": False, "mtu": self.mtu, "ipam": ipam}]

    def start_node(self, node: "NodeHost", ns: Netns) -> None:
        super().start_node(node, ns)
        ns.ensure_bridge(DOCKER_BRIDGE, self.mtu)
        ns.ensure_addr(DOCKER_BRIDGE, f"{DOCKER_GATEWAY}/{DOCKER_SUBNET.prefixlen}")
        ns.link_up(DOCKER_BRIDGE)
        proc.run(["iptables-restore", "--noflush"], input=_nat_rules().encode(), netns=node.netns,
                 where=node.name)

    def add_peer(self, node: "NodeHost", ns: Netns, peer: "NodeHost") -> None:
        """Docker knows nothing of other hosts: no routes to their containers."""

    def remove_peer(self, node: "NodeHost", ns: Netns, peer: "NodeHost") -> None:
        pass

    def publish(self, pod: Any, host_port: int, container_port: int, proto: str = "TCP") -> None:
        """``docker run -p host_port:container_port``: DNAT on the pod's node."""
        node = self.cluster.nodes[pod.node_name]
        key = (node.name, host_port, proto)
        if key in self._published:
            raise K8sNetLabError(f"pod {pod.name}: host port {host_port}/{proto} on {node.name} is "
                                 f"already published by {self._published[key][0]}")
        for rule in publish_rules(pod.ip, proto, host_port, container_port):
            node.run(["iptables", "-w", rule[0], rule[1], "-A", *rule[2:]])
        self._published[key] = (pod.name, container_port)

    def unpublish(self, pod: Any, host_port: int, container_port: int, proto: str = "TCP") -> None:
        node = self.cluster.nodes.get(pod.node_name)
        if node is None or self._published.pop((node.name, host_port, proto), None) is None:
            return
        for rule in publish_rules(pod.ip, proto, host_port, container_port):
            node.run(["iptables", "-w", rule[0], rule[1], "-D", *rule[2:]], check=False)

    def pod_added(self, pod: Any) -> None:
        for c in pod.spec.containers:
            for p in c.ports:
                if p.host_port is not None:
                    self.publish(pod, p.host_port, p.container_port, p.protocol)

    def pod_removed(self, pod: Any) -> None:
        for (node, host_port, proto), (owner, container_port) in list(self._published.items()):
            if owner == pod.name:
                self.unpublish(pod, host_port, container_port, proto)

    def published(self, pod_name: str) -> list[tuple[str, int, int, str]]:
        """(node IP, host port, container port, protocol) of a pod's published ports."""
        pod = self.cluster.pods[pod_name]
        node = self.cluster.nodes[pod.node_name]
        return [(node.ip, p.host_port, p.container_port, p.protocol)
                for c in pod.spec.containers for p in c.ports if p.host_port is not None]
