"""The underlay: what Mininet's ``buildFromTopo`` builds, from the cluster spec.

One Linux bridge per subnet (or the switches of ``underlay.switches``; Open vSwitch with
``underlay.switch: ovs``), a host per node (``eth0`` on its subnet), per router (forwarding on,
static routes between subnets, several equal first hops as one ECMP route) and per plain
underlay host. Nodes, routers and hosts get a default route. Nodes and hosts can join and
leave a running underlay. Pods are no part of it: :meth:`Underlay.adopt` only lists a pod's
sandbox with Mininet so that the Mininet CLI finds it by name.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from typing import Any, Callable

from mininet.link import Link
from mininet.net import Mininet
from mininet.nodelib import LinuxBridge

from . import naming, netutil
from .statedir import StateDir
from .netutil import Netns
from .pod import NetnsHost, NodeHost, RouterHost
from .clusterspec import ClusterSpec, NodeSpec

log = logging.getLogger(__name__)

# the outer 5-tuple: source and destination address, protocol, source and destination port
ECMP_HASH_FIELDS = "0x0037"
# device group of a cluster's root-namespace links while its underlay is deleted ("kn" + index)
LINK_GROUP_BASE = 0x6B6E0000


def underlay_first_hops(router: str, on: dict[str, list[str]],
                        addr: dict[tuple[str, str], str]) -> dict[str, list[str]]:
    """For ``router``: every subnet it does not sit on -> the sorted gateways (addresses of
    neighbour routers) that start a shortest path there, counted in router hops. ``on``:
    router -> its subnets; ``addr``: (router, subnet) -> its address there."""
    dist = {s: 0 for s in on[router]}
    first: dict[str, set[str]] = {s: set() for s in on[router]}
    queue = deque(on[router])
    while queue:
        s = queue.popleft()
        for other, its in on.items():
            if other == router or s not in its:
                continue
            via = first[s] or {addr[(other, s)]}
            for nxt in its:
                if nxt not in dist:
                    dist[nxt] = dist[s] + 1
                    first[nxt] = set(via)
                    queue.append(nxt)
                elif dist[nxt] == dist[s] + 1 and dist[nxt] > 0:
                    first[nxt] |= via
    return {s: sorted(g) for s, g in first.items() if dist[s] > 0}


class _PremadeLink(Link):
    """A Mininet link whose veth pair the underlay made already (one ``ip -batch`` for all
    node uplinks): Mininet only records it, no shell command per link."""

    @classmethod
    def makeIntfPair(cls, *args: Any, **kwargs: Any) -> None:
        return None


class _Bridge(LinuxBridge):
    """Mininet's Linux bridge, started by one ``ip -batch`` in the root namespace instead of
    a ``brctl addif`` and an ``ifconfig`` per port through the switch's shell (at 100 nodes,
    100 shell round trips)."""

    def start(self, _controllers: Any) -> None:
        lines = [f"link del {self.name}"] if os.path.exists(f"/sys/class/net/{self.name}") else []
        lines.append(f"link add name {self.name} type bridge")
        for intf in self.intfList():
            if self.name in intf.name:
                lines += [f"link set {intf.name} master {self.name}", f"link set {intf.name} up"]
        lines.append(f"link set {self.name} up")
        netutil.ip_batch(lines, where=f"switch {self.name}")


class Underlay:
    """Switches, links, node / router / plain hosts of one cluster, and their routes."""

    def __init__(self, spec: ClusterSpec, state: StateDir):
        self.spec = spec
        self.state = state
        self.net: Mininet | None = None
        self.nodes: dict[str, NodeHost] = {}
        self.routers: dict[str, RouterHost] = {}
        self.hosts: dict[str, NetnsHost] = {}      # underlay hosts that are not nodes
        self.switches: dict[str, Any] = {}         # by cluster-file name
        self.switch_plan: Any = None               # switching.Plan: switches, links, who plugs where
        self.ovs: Any = None                       # underlay_ovs.OvsUnderlay with underlay.switch: ovs
        self._ports: dict[str, int] = {}           # last port number used on each subnet's switch(es)
        self._veths: list[str] | None = None       # while building: uplinks to make in one batch
        self.shaped_links: Any = []                # shaping.apply's record

    def record(self, pid: int, what: str) -> None:
        self.state.record_pid(pid, what)

    def _new_host(self, name: str, cls: type, **params: Any) -> Any:
        assert self.net is not None
        host = self.net.addHost(name, cls=cls, **params)
        host.on_popen = self.record
        self.state.record_pid(host.pid, f"{cls.__name__} {name}")
        self.state.record_netns(host.pid, name)
        return host

    # -- build -------------------------------------------------------------------------------
    def build(self, timings: dict[str, float]) -> None:
        from . import switching
        self.switch_plan = plan = switching.plan(self.spec)
        if self.spec.underlay.switch == "ovs":
            from .underlay_ovs import OvsUnderlay
            self.ovs = OvsUnderlay(self.spec, self.state)
            self.ovs.start()
        self.net = Mininet(topo=None, build=False, controller=None,
                           switch=self.ovs.switch_class() if self.ovs else _Bridge,
                           autoSetMacs=False, waitConnected=False, inNamespace=False)
        ports = self._ports
        for i, s in enumerate(plan.switches, start=1):
            sw_name = naming.switch_name(self.state.index, i)
            self.switches[s.name] = self.net.addSwitch(sw_name, dpid=f"{self.state.index:04x}{i:012x}")
            ports[s.subnet] = 0
        subnet_of = {s.name: s.subnet for s in plan.switches}
        for link in plan.links:     # switch to switch; port numbers count on per subnet
            a, b, sub = self.switches[link.a], self.switches[link.b], subnet_of[link.a]
            ports[sub] += 2
            self.net.addLink(a, b, intfName1=naming.switch_port(a.name, ports[sub] - 1),
                             intfName2=naming.switch_port(b.name, ports[sub]))
        self._veths = [] if self.ovs is None else None
        for n in self.spec.nodes:
            self._add_node_host(n)
        for h in self.spec.underlay.hosts:
            self._add_plain_host(h.name, h.subnet, h.ip)
        if self._veths:     # every uplink veth at once, the host end already in its namespace
            netutil.ip_batch(self._veths, where="the root namespace")
        self._veths = None
        for r in self.spec.underlay.routers:
            router = self._new_host(r.name, RouterHost, ip=None)
            self.routers[r.name] = router
            for k, (subnet, ip) in enumerate(r.interfaces):
                ports[subnet] += 1
                sw = self._switch_at(r.name, subnet)
                plen = self.spec.underlay.subnet(subnet).cidr.prefixlen
                self.net.addLink(router, sw, intfName1=f"eth{k}",
                                 intfName2=naming.switch_port(sw.name, ports[subnet]),
                                 params1={"ip": f"{ip}/{plen}"})
        self._mark_root_links()         # the veths exist now; the bridges after start()
        self.net.build()
        for sw in self.switches.values():
            self.state.record_pid(sw.pid, f"switch shell {sw.name}")
        self.net.start()
        self._mark_root_links()
        if self.ovs is not None:
            self.ovs.prepare_all(list(self.switches.values()))
            timings["controller_ready_s"] = self.ovs.wait_ready(list(self.switches.values()), len(plan.links))
        for host in [*self.nodes.values(), *self.hosts.values()]:
            self._host_defaults(host)
        self._route()
        from . import shaping
        self.shaped_links = shaping.apply(self)     # link properties of the cluster file

    def _add_node_host(self, n: NodeSpec) -> NodeHost:
        subnet = self.spec.underlay.subnet(n.subnet)
        host = self._new_host(n.name, NodeHost, spec=n, state_dir=self.state.node_dir(n.name),
                              ip=f"{n.ip}/{subnet.cidr.prefixlen}")
        self._uplink(host, n.subnet)
        self.nodes[n.name] = host
        return host

    def _add_plain_host(self, name: str, subnet_name: str, ip: Any) -> NetnsHost:
        subnet = self.spec.underlay.subnet(subnet_name)
        host = self._new_host(name, NetnsHost, ip=f"{ip}/{subnet.cidr.prefixlen}")
        host.subnet = subnet_name
        self._uplink(host, subnet_name)
        self.hosts[name] = host
        return host

    def _uplink(self, host: NetnsHost, subnet: str) -> None:
        assert self.net is not None
        self._ports[subnet] = self._ports.get(subnet, 0) + 1
        sw = self._switch_at(host.name, subnet)
        port = naming.switch_port(sw.name, self._ports[subnet])
        if self._veths is None:
            self.net.addLink(host, sw, intfName1=naming.NODE_UPLINK, intfName2=port)
            return
        # building a Linux-bridge underlay: the pair is made in the batch; the host end comes
        # up with its address (Mininet's configHosts), the switch end with the bridge
        mac1, mac2 = self.net.randMac(), self.net.randMac()      # as Mininet's addLink picks them
        self._veths.append(f"link add name {port} address {mac2} type veth peer name {naming.NODE_UPLINK} "
                           f"address {mac1} netns {host.pid}\n")
        self.net.addLink(host, sw, intfName1=naming.NODE_UPLINK, intfName2=port, cls=_PremadeLink,
                         addr1=mac1, addr2=mac2, params1={"up": None}, params2={"up": None})

    def _switch_at(self, host: str, subnet: str) -> Any:
        """The switch where ``host`` plugs into ``subnet`` (underlay.switches, else the subnet's)."""
        return self.switches[self.switch_plan.switch_for(host, subnet)]

    def _mark_root_links(self) -> None:
        """Mark the root-namespace links of the switches as this cluster's (``clean`` deletes
        only marked or recorded links)."""
        sws = list(self.switches.values())
        self.state.mark_links([sw.name for sw in sws] + [i.name for sw in sws for i in sw.intfList()])

    def _attach_last_link(self) -> None:
        """Plug the newest Mininet link into its (already running) switch."""
        assert self.net is not None
        link = self.net.links[-1]
        self._mark_root_links()
        if self.ovs is not None:
            link.intf2.node.attach(link.intf2)
            self.ovs.prepare_host_side(link.intf1.node, link.intf1.name)
            return
        with Netns(None, "the root namespace") as ns:
            ns.set_master(link.intf2.name, link.intf2.node.name)
            ns.link_up(link.intf2.name)

    def _host_defaults(self, host: NetnsHost) -> None:
        """A default route (Calico's proxy ARP needs one; on a flat L2 it points at the wire)."""
        subnet = self.spec.underlay.subnet(host.spec.subnet if isinstance(host, NodeHost) else host.subnet)
        with Netns(host.netns, host.name) as ns:
            ns.link_up("lo")
            if subnet.gateway is not None:
                ns.add_route("default", gateway=str(subnet.gateway), dev=naming.NODE_UPLINK)
            else:
                ns.add_route("default", dev=naming.NODE_UPLINK)

    def _route(self) -> None:
        """Static routes between subnets through the routers: every shortest path by hops,
        several first hops as one ECMP route, hashed on the outer 5-tuple as a fabric's
        switches do (``fib_multipath_hash_policy=3`` with :data:`ECMP_HASH_FIELDS`): VXLAN's
        UDP source ports spread over the paths, IPIP between two nodes always takes one."""
        if not self.routers:
            return
        subnets = {s.name: s for s in self.spec.underlay.subnets}
        on = {r.name: [s for s, _ in r.interfaces] for r in self.spec.underlay.routers}
        addr = {(r.name, s): str(ip) for r in self.spec.underlay.routers for s, ip in r.interfaces}
        for r in self.spec.underlay.routers:
            hops = underlay_first_hops(r.name, on, addr)
            with Netns(self.routers[r.name].netns, r.name) as ns:
                ns.set_sysctl("net.ipv4.ip_forward", 1)
                # policy 3 hashes the listed header fields; policy 1 would reuse the hash
                # the sending socket put on the skb (it survives the veths), which a switch
                # never sees: it would spread IPIP by the inner flow
                ns.set_sysctl("net.ipv4.fib_multipath_hash_policy", 3)
                ns.set_sysctl("net.ipv4.fib_multipath_hash_fields", ECMP_HASH_FIELDS)
                for s, gateways in hops.items():
                    if len(gateways) == 1:
                        ns.add_route(str(subnets[s].cidr), gateway=gateways[0])
                    elif gateways:
                        ns.add_multipath_route(str(subnets[s].cidr), gateways)

    def _stop_linux_bridges(self) -> None:
        """What ``Mininet.stop`` does for Linux bridges, in bulk: Mininet deletes each
        interface through its node's shell and each bridge with ``brctl`` (two shell round
        trips per link, ~1 s at 100 nodes); here one ``ip -batch`` in the root namespace
        deletes one root-side end of every link (the kernel removes its peer) and then the
        bridges, and every shell is signalled before any is waited for."""
        net = self.net
        assert net is not None
        names = []
        for link in net.links:
            for intf in (link.intf1, link.intf2):
                if intf is not None and not getattr(intf.node, "inNamespace", True):
                    names.append(intf.name)       # one end in the root namespace is enough
                    break
        names += [sw.name for sw in net.switches]
        present = [n for n in dict.fromkeys(names) if os.path.exists(f"/sys/class/net/{n}")]
        if present:
            # one request deletes a group of links at once, with one wait for the kernel's
            # RCU grace period (a delete each waits once per link: ~1 s at 100 nodes); the
            # group number is this cluster's, and used only if no other link carries it
            group = LINK_GROUP_BASE + self.state.index
            if self._group_is_free(group, set(present)):
                batch = [f"link set {n} group {group}" for n in present] + [f"link del group {group}"]
            else:
                batch = [f"link del {n}" for n in present]
            netutil.ip_batch(batch, where="the root namespace")
        nodes = [*net.hosts, *net.switches]
        for node in nodes:
            shell = node.shell
            if shell is not None and shell.poll() is None:
                try:
                    os.killpg(shell.pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass
        for node in nodes:
            node.terminate()
        net.links.clear()

    @staticmethod
    def _group_is_free(group: int, ours: set[str]) -> bool:
        """Does no link of the root namespace but ``ours`` carry device group ``group``?"""
        for name in os.listdir("/sys/class/net"):
            if name in ours:
                continue
            try:
                with open(f"/sys/class/net/{name}/netdev_group") as f:
                    if int(f.read().strip()) == group:
                        return False
            except (OSError, ValueError):
                continue
        return True

    # -- a running underlay -----------------------------------------------------------------
    def join_node(self, n: NodeSpec) -> NodeHost:
        """A node host joins the running underlay (addressed, default route, announced)."""
        host = self._add_node_host(n)
        self._join(host, str(n.ip))
        return host

    def join_host(self, name: str, subnet: str, ip: Any) -> NetnsHost:
        host = self._add_plain_host(name, subnet, ip)
        self._join(host, str(ip))
        return host

    def _join(self, host: NetnsHost, ip: str) -> None:
        self._attach_last_link()
        host.configDefault()  # addresses eth0 (Mininet's params1)
        self._announce(host, ip)
        self._host_defaults(host)

    def _announce(self, host: NetnsHost, ip: str) -> None:
        """A joining host may reuse the address of one that left: the others forget the old
        MAC (what a gratuitous ARP does on a real segment, without waiting for ARP timers)."""
        for other in [*self.nodes.values(), *self.routers.values(), *self.hosts.values()]:
            if other is not host:
                with Netns(other.netns, other.name) as ns:
                    ns.flush_neigh(ip)

    def leave_node(self, name: str) -> NodeHost:
        """Unplug and stop a node host."""
        assert self.net is not None
        node = self.nodes.pop(name)
        for intf in list(node.intfList()):
            if intf.link:
                self.net.delLink(intf.link)
        self.net.delHost(node)
        return node

    def adopt(self, host: Any) -> None:
        """List a pod sandbox with Mininet (so that its CLI finds it by name)."""
        assert self.net is not None
        self.net.hosts.append(host)
        self.net.nameToNode[host.name] = host

    def forget_all(self, hosts: list[Any]) -> None:
        """:meth:`forget` for many (one pass over Mininet's host list, not one per host)."""
        if self.net is None:
            return
        gone = {id(h) for h in hosts}
        for h in hosts:
            self.net.nameToNode.pop(h.name, None)
        self.net.hosts[:] = [h for h in self.net.hosts if id(h) not in gone]

    def forget(self, host: Any) -> None:
        if self.net is None:
            return
        self.net.nameToNode.pop(host.name, None)
        try:
            self.net.hosts.remove(host)
        except ValueError:
            pass

    def stop(self, attempt: Callable[..., None]) -> None:
        if self.net is not None:
            if self.ovs is None:
                attempt("stop the underlay", self._stop_linux_bridges)
            else:
                attempt("stop Mininet", self.net.stop)
        if self.ovs is not None:
            attempt("stop Open vSwitch and its controller", self.ovs.stop)
            self.ovs = None
        self.nodes.clear()
        self.routers.clear()
        self.hosts.clear()
        self.net = None
