"""The emulated cluster: Mininet underlay, node agents, pod sandboxes wired by CNI.

``Cluster.start()`` (also ``with Cluster.from_file(path, cni="ipip") as c:``):

1. builds the underlay with Mininet: one Linux bridge per subnet (no controller), a host per
   node (``eth0`` on its subnet) and per router (forwarding on, static routes between subnets);
2. starts the mode's node agent on every node (sysctls, VTEP or BPF programs, routes to the
   other nodes' pod CIDRs), like flanneld / calico-node;
3. for every pod: schedules it (``nodeName``, ``nodeSelector``, else the node with the fewest
   pods of its workload, then the least loaded), creates its sandbox (a Mininet host without
   links) and runs the node's CNI network config list with ``CNI_NETNS`` pointing at the
   sandbox's namespace, exactly as a kubelet would; ADDs run concurrently; then starts the
   pod's containers.

``stop()`` undoes all of it in reverse: containers, CNI DEL per pod, node agents, Mininet,
the state directory. It runs from ``__exit__`` and so after an exception or Ctrl-C too;
whatever a ``kill -9`` leaves is found by ``k8snetlab clean`` (see :mod:`k8snetlab.cleanup`).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import dataclasses
import secrets
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from mininet.log import setLogLevel
from mininet.net import Mininet
from mininet.nodelib import LinuxBridge

from . import addons as addonmod, checks, cleanup, signals, manifests, naming, proc, spec as specmod
from .cni import INVOKERS, CNIRuntime, NetworkConfigList, RuntimeConf
from .errors import K8sNetLabError, SpecError
from .manifests import PodSpec, Workload
from .modes import MODES, Mode
from .modes.resync import AgentResync
from .supervisor import ContainerSupervisor
from .netutil import Netns
from .pod import NetnsHost, NodeHost, Pod, RouterHost
from .clusterspec import ClusterSpec, NodeSpec, parse_address

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_TOOLS = ("ip", "mnexec", "brctl", "ifconfig")



# the outer 5-tuple: source and destination address, protocol, source and destination port
ECMP_HASH_FIELDS = "0x0037"


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


class Cluster:
    """One emulated cluster. Not thread-safe: drive it from one thread."""

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.mode: Mode = MODES.get(spec.cni.type)(self, spec.cni.options)
        self.net: Mininet | None = None
        self.state: cleanup.StateDir | None = None
        self.nodes: dict[str, NodeHost] = {}
        self.routers: dict[str, RouterHost] = {}
        self.hosts: dict[str, NetnsHost] = {}      # underlay hosts that are not nodes
        self.pods: dict[str, Pod] = {}
        self.workloads: dict[str, Workload] = {w.name: w for w in spec.workloads if w.kind != "Pod"}
        self.addons: list[addonmod.Addon] = []
        self.timings: dict[str, float] = {}
        self._netconfs: dict[str, NetworkConfigList] = {}
        self._runtimes: dict[str, CNIRuntime] = {}
        self._peers: set[tuple[str, str]] = set()
        self._switches: dict[str, Any] = {}
        self._ports: dict[str, int] = {}         # last port number used on each subnet's switch(es)
        self.switch_plan: Any = None             # switching.Plan: switches, links, who plugs where
        self.ovs: Any = None                     # underlay_ovs.OvsUnderlay with underlay.switch: ovs
        self._gone: dict[str, NodeHost] = {}     # nodes that left, until their routes are gone
        # node agents: node-list changes and the periodic reconcile take turns
        self.agent_lock = threading.RLock()
        self.agent_resync: AgentResync | None = None
        self.supervisor: ContainerSupervisor | None = None   # the kubelets' container restarts
        self._started = False

    @classmethod
    def from_file(cls, path: str | Path, cni: str | None = None,
                  params: dict[str, Any] | None = None) -> "Cluster":
        return cls(specmod.load(path, cni=cni, params=params))

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @signals.deferring      # SIGINT/SIGTERM act at the checkpoints between steps, then stop()
    def start(self) -> "Cluster":
        proc.require_root()
        proc.require(*BASE_TOOLS, *self.mode.tools)
        t0 = time.monotonic()
        setLogLevel("error")
        self.state = cleanup.StateDir.create(self.spec.name)
        self._started = True
        try:
            self._write_cni_bin()
            self._build_underlay()
            self.timings["underlay_s"] = time.monotonic() - t0
            signals.checkpoint()
            self._start_node_agents()
            self._start_agent_resync()
            signals.checkpoint()
            self.timings["agents_s"] = time.monotonic() - t0 - self.timings["underlay_s"]
            t1 = time.monotonic()
            pods = self.spec.pods()
            for i in range(0, len(pods), checks.POD_BATCH):   # bounded: sandboxes a batch at a time
                self._add_pods(pods[i:i + checks.POD_BATCH])
                signals.checkpoint()
            self.timings["pods_s"] = time.monotonic() - t1
            t2 = time.monotonic()
            for cls in addonmod.addon_classes():
                if cls.wanted(self.spec):
                    addon = cls(self)
                    self.addons.append(addon)
                    addon.start()
                    signals.checkpoint()
            self.timings["addons_s"] = time.monotonic() - t2
            self._start_supervisor()
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = time.monotonic() - t0
        log.info("cluster %s up (%s, %d nodes, %d pods) in %.2f s", self.spec.name, self.spec.cni.type,
                 len(self.nodes), len(self.pods), self.timings["start_s"])
        return self

    @signals.deferring      # a signal during teardown takes effect once it is complete
    def stop(self) -> None:
        """Tear everything down; safe to call twice and after a failed start."""
        if not self._started:
            return
        self._started = False
        t0 = time.monotonic()
        errors: list[str] = []

        def attempt(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:  # keep going: the rest must be removed too
                errors.append(f"{what}: {e}")
                log.warning("teardown: %s: %s", what, e)

        if self.supervisor is not None:
            attempt("stop the container supervision", self.supervisor.stop)
            self.supervisor = None
        if self.agent_resync is not None:
            attempt("stop the node agents' resync", self.agent_resync.stop)
            self.agent_resync = None
        for addon in reversed(self.addons):
            attempt(f"stop {addon.name}", addon.stop)
        self.addons.clear()
        for pod in list(self.pods.values()):
            attempt(f"stop containers of {pod.name}", pod.stop_containers)
        self._parallel([(self._cni_del, p) for p in self.pods.values() if p.result is not None],
                       errors, "CNI DEL")
        for node in self.nodes.values():
            attempt(f"stop node agent on {node.name}", self.mode.stop_node, node)
        if self.net is not None:
            attempt("stop processes in testbed namespaces", self._kill_in,
                    *self.pods.values(), *self.nodes.values(), *self.routers.values(), *self.hosts.values())
            attempt("stop Mininet", self.net.stop)
        if self.ovs is not None:
            attempt("stop Open vSwitch and its controller", self.ovs.stop)
            self.ovs = None
        if self.state is not None:
            attempt("remove state", self.state.remove)
        self.pods.clear()
        self.nodes.clear()
        self.routers.clear()
        self.hosts.clear()
        self.net = None
        self.timings["stop_s"] = time.monotonic() - t0
        if errors:
            log.warning("teardown finished with %d problem(s); 'k8snetlab clean' removes leftovers", len(errors))

    # -- underlay ---------------------------------------------------------------------------------
    def _record(self, pid: int, what: str) -> None:
        if self.state is not None:
            self.state.record_pid(pid, what)

    def _new_host(self, name: str, cls: type, **params: Any) -> Any:
        assert self.net is not None and self.state is not None
        host = self.net.addHost(name, cls=cls, **params)
        host.on_popen = self._record
        self.state.record_pid(host.pid, f"{cls.__name__} {name}")
        self.state.record_netns(host.pid, name)
        return host

    def _build_underlay(self) -> None:
        assert self.state is not None
        from . import switching
        self.switch_plan = plan = switching.plan(self.spec)
        if self.spec.underlay.switch == "ovs":
            from .underlay_ovs import OvsUnderlay
            self.ovs = OvsUnderlay(self.spec, self.state)
            self.ovs.start()
        self.net = Mininet(topo=None, build=False, controller=None,
                           switch=self.ovs.switch_class() if self.ovs else LinuxBridge,
                           autoSetMacs=False, waitConnected=False, inNamespace=False)
        ports = self._ports
        for i, s in enumerate(plan.switches, start=1):
            sw_name = naming.switch_name(self.state.index, i)
            self._switches[s.name] = self.net.addSwitch(sw_name, dpid=f"{self.state.index:04x}{i:012x}")
            ports[s.subnet] = 0
        subnet_of = {s.name: s.subnet for s in plan.switches}
        for link in plan.links:     # switch to switch; port numbers count on per subnet
            a, b, sub = self._switches[link.a], self._switches[link.b], subnet_of[link.a]
            ports[sub] += 2
            self.net.addLink(a, b, intfName1=naming.switch_port(a.name, ports[sub] - 1),
                             intfName2=naming.switch_port(b.name, ports[sub]))
        for n in self.spec.nodes:
            self._add_node_host(n, ports)
        for h in self.spec.underlay.hosts:
            self._add_plain_host(h.name, h.subnet, h.ip, ports)
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
        for sw in self._switches.values():
            self.state.record_pid(sw.pid, f"switch shell {sw.name}")
        self.net.start()
        self._mark_root_links()
        if self.ovs is not None:
            self.ovs.prepare_all(list(self._switches.values()))
            self.timings["controller_ready_s"] = self.ovs.wait_ready(list(self._switches.values()), len(plan.links))
        for node in self.nodes.values():
            self._node_defaults(node)
        for host in self.hosts.values():
            self._node_defaults(host)
        self._route_underlay()
        from . import shaping
        self.shaped_links = shaping.apply(self)     # link properties of the cluster file

    def _add_node_host(self, n: NodeSpec, ports: dict[str, int]) -> NodeHost:
        assert self.net is not None and self.state is not None
        subnet = self.spec.underlay.subnet(n.subnet)
        host = self._new_host(n.name, NodeHost, spec=n, state_dir=self.state.node_dir(n.name),
                              ip=f"{n.ip}/{subnet.cidr.prefixlen}")
        ports[n.subnet] = ports.get(n.subnet, 0) + 1
        sw = self._switch_at(n.name, n.subnet)
        self.net.addLink(host, sw, intfName1=naming.NODE_UPLINK,
                         intfName2=naming.switch_port(sw.name, ports[n.subnet]))
        self.nodes[n.name] = host
        return host

    def _add_plain_host(self, name: str, subnet_name: str, ip: Any, ports: dict[str, int]) -> NetnsHost:
        assert self.net is not None
        subnet = self.spec.underlay.subnet(subnet_name)
        host = self._new_host(name, NetnsHost, ip=f"{ip}/{subnet.cidr.prefixlen}")
        host.subnet = subnet_name
        ports[subnet_name] = ports.get(subnet_name, 0) + 1
        sw = self._switch_at(name, subnet_name)
        self.net.addLink(host, sw, intfName1=naming.NODE_UPLINK,
                         intfName2=naming.switch_port(sw.name, ports[subnet_name]))
        self.hosts[name] = host
        return host

    def add_host(self, name: str, ip: str, subnet: str | None = None) -> NetnsHost:
        """A plain host joins the underlay of a running cluster (an external client, a load
        balancer): ``eth0`` on the subnet, default route via the subnet's gateway."""
        assert self.net is not None
        addr = parse_address(ip, f"host {name}")
        taken = {n.ip for n in self.spec.nodes} | {ip for r in self.spec.underlay.routers for _, ip in r.interfaces}
        taken |= {parse_address(h.IP(), h.name) for h in self.hosts.values() if h.IP()}
        if name in self.nodes or name in self.pods or name in self.routers or name in self.hosts:
            raise SpecError(f"host name {name!r} is already taken")
        if addr in taken:
            raise SpecError(f"host {name}: {addr} is already used on the underlay")
        sub = subnet or next((s.name for s in self.spec.underlay.subnets if addr in s.cidr), None)
        if sub is None or addr not in self.spec.underlay.subnet(sub).cidr:
            raise SpecError(f"host {name}: {addr} is in none of the underlay subnets")
        host = self._add_plain_host(name, sub, addr, self._ports)
        self._attach_last_link(sub)
        host.configDefault()
        self._node_defaults(host)
        return host

    def _switch_at(self, host: str, subnet: str) -> Any:
        """The switch where ``host`` plugs into ``subnet`` (underlay.switches, else the subnet's)."""
        return self._switches[self.switch_plan.switch_for(host, subnet)]

    def _mark_root_links(self) -> None:
        """Mark the underlay's root-namespace links as this cluster's (``clean`` deletes only
        marked or recorded links)."""
        assert self.state is not None
        sws = list(self._switches.values())
        self.state.mark_links([sw.name for sw in sws] + [i.name for sw in sws for i in sw.intfList()])

    def _attach_last_link(self, subnet: str) -> None:
        """Plug the newest Mininet link into its (already running) switch."""
        assert self.net is not None
        link = self.net.links[-1]
        self._mark_root_links()
        if self.ovs is not None:
            link.intf2.node.attach(link.intf2)
            self.ovs.prepare_host_side(link.intf1.node, link.intf1.name)
            return
        proc.run(["brctl", "addif", link.intf2.node.name, link.intf2.name])
        proc.run(["ip", "link", "set", link.intf2.name, "up"])

    def _node_defaults(self, node: NetnsHost) -> None:
        """A default route (Calico's proxy ARP needs one; on a flat L2 it points at the wire)."""
        subnet = self.spec.underlay.subnet(node.spec.subnet if isinstance(node, NodeHost) else node.subnet)
        with Netns(node.netns, node.name) as ns:
            ns.link_up("lo")
            if subnet.gateway is not None:
                ns.add_route("default", gateway=str(subnet.gateway), dev=naming.NODE_UPLINK)
            else:
                ns.add_route("default", dev=naming.NODE_UPLINK)

    def _route_underlay(self) -> None:
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

    # -- node agents ------------------------------------------------------------------------------
    def _start_node_agents(self) -> None:
        if not self.nodes:
            return
        self.mode.prepare(next(iter(self.nodes.values())))
        for node in self.nodes.values():
            self._start_node(node)
        self.sync_routes()

    def _start_supervisor(self) -> None:
        """The kubelets' container restarts and readiness (supervisor.py); the add-ons hear
        of readiness changes (Endpoints follow)."""
        assert self.state is not None

        def tell(pods: list[Pod]) -> None:
            for addon in self.addons:
                addon.pods_readiness_changed(pods)

        self.supervisor = ContainerSupervisor(lambda: self.pods, self.state.path / "logs", tell)
        self.supervisor.start()

    def _start_agent_resync(self) -> None:
        """The node agents' periodic reconcile (modes/resync.py), when the mode has one."""
        period = self.mode.resync_period
        if period is not None and self.nodes:
            self.agent_resync = AgentResync(self.mode, lambda: self.nodes, period, self.agent_lock)
            self.agent_resync.start()

    def _start_node(self, node: NodeHost) -> None:
        assert self.state is not None
        with Netns(node.netns, node.name) as ns:
            self.mode.start_node(node, ns)
        conf = self.mode.netconf(node)
        self._netconfs[node.name] = conf
        netd = node.state_dir / "net.d"
        netd.mkdir(exist_ok=True)
        (netd / f"10-{conf.name}.conflist").write_text(json.dumps(conf.to_dict(), indent=2) + "\n")
        invoker = INVOKERS.get(self.spec.cni.invoke)()
        self._runtimes[node.name] = CNIRuntime(node.netns, node.state_dir / "results", invoker)

    def sync_routes(self) -> None:
        """Program every node's routes to every other node's pod CIDR (what flanneld does on a
        node-list change); remove those of nodes that left."""
        with self.agent_lock:
            self._sync_routes()

    def _sync_routes(self) -> None:
        want = {(a, b) for a in self.nodes for b in self.nodes if a != b}
        for a, b in sorted(self._peers - want):
            if a in self.nodes:
                with Netns(self.nodes[a].netns, a) as ns:
                    self.mode.remove_peer(self.nodes[a], ns, self._gone[b])
            self._peers.discard((a, b))
        missing = want - self._peers     # once: per pair it made a 100-node start take seconds
        for a in self.nodes:
            todo = [b for b in self.nodes if (a, b) in missing]
            if not todo:
                continue
            with Netns(self.nodes[a].netns, a) as ns:
                for b in todo:
                    self.mode.add_peer(self.nodes[a], ns, self.nodes[b])
                    self._peers.add((a, b))

    def add_node(self, name: str, ip: str, subnet: str | None = None, pod_cidr: str | None = None) -> NodeHost:
        """A node joins: underlay link, node agent, and every node's routes are updated."""
        assert self.net is not None and self.state is not None
        data = {"name": name, "ip": ip, **({"subnet": subnet} if subnet else {}),
                **({"podCIDR": pod_cidr} if pod_cidr else {})}
        raw_nodes = [{"name": n.name, "ip": str(n.ip), "subnet": n.subnet, "podCIDR": str(n.pod_cidr),
                      "labels": dict(n.labels)} for n in self.spec.nodes] + [data]
        new_spec = specmod.with_nodes(self.spec, raw_nodes)
        n = new_spec.node(name)
        host = self._add_node_host(n, self._ports)
        self._attach_last_link(n.subnet)
        host.configDefault()  # addresses the node's eth0 (Mininet's params1)
        self._announce(host, ip)
        self.spec = new_spec
        self._node_defaults(host)
        with self.agent_lock:
            self._start_node(host)
            self.sync_routes()
        for addon in self.addons:
            addon.node_added(host)
        return host

    def _announce(self, host: NetnsHost, ip: str) -> None:
        """A joining host may reuse the address of one that left: the others forget the old
        MAC (what a gratuitous ARP does on a real segment, without waiting for ARP timers)."""
        for other in [*self.nodes.values(), *self.routers.values(), *self.hosts.values()]:
            if other is not host:
                other.run(["ip", "neigh", "flush", "to", ip], check=False)

    def remove_node(self, name: str) -> None:
        """A node leaves: its pods are deleted, every node forgets its routes."""
        node = self.nodes.get(name)
        if node is None:
            raise K8sNetLabError(f"no node {name!r}")
        for pod in [p for p in self.pods.values() if p.node_name == name]:
            self.delete_pod(pod.name)
        with self.agent_lock:
            self.mode.stop_node(node)
            self._gone[name] = self.nodes.pop(name)
            # the name and address are free again (a node may rejoin)
            self.spec = dataclasses.replace(self.spec, nodes=tuple(n for n in self.spec.nodes if n.name != name))
            self.sync_routes()
        assert self.net is not None
        for intf in list(node.intfList()):
            if intf.link:
                self.net.delLink(intf.link)
        self.net.delHost(node)
        for addon in self.addons:
            addon.node_removed(name)

    # -- pods -------------------------------------------------------------------------------------
    def schedule(self, pod: PodSpec) -> str:
        if pod.node_name:
            if pod.node_name not in self.nodes:
                raise SpecError(f"pod {pod.name}: nodeName {pod.node_name!r} is not a node")
            return pod.node_name
        # kube-scheduler's default scoring, reduced to what matters here: spread the pods of
        # one workload over the nodes (default topology spread on kubernetes.io/hostname), then
        # prefer the node with the fewest pods; ties go to the node listed first.
        siblings = {n: 0 for n in self.nodes}
        load = {n: 0 for n in self.nodes}
        for p in self.pods.values():
            if p.node_name in load:
                load[p.node_name] += 1
                if pod.owner is not None and p.spec.owner == pod.owner:
                    siblings[p.node_name] += 1
        candidates = [n for n, host in self.nodes.items()
                      if all(host.spec.labels.get(k) == v for k, v in pod.node_selector.items())]
        if not candidates:
            raise SpecError(f"pod {pod.name}: no node matches nodeSelector {pod.node_selector}")
        order = list(self.nodes)
        return min(candidates, key=lambda n: (siblings[n], load[n], order.index(n)))

    def add_pod(self, manifest: dict[str, Any] | PodSpec | Workload) -> list[Pod]:
        """Add the pod(s) of a manifest (dict), a PodSpec or a Workload; return them."""
        if isinstance(manifest, dict):
            manifest = manifests.parse_workload(manifest, "manifest")
        pods = manifest.pods() if isinstance(manifest, Workload) else [manifest]
        for p in pods:
            h = p.host_name
            if h in self.pods or h in self.nodes or h in self.routers or h in self.hosts:
                raise SpecError(f"pod {p.key}: the name {h!r} is already taken")
        if isinstance(manifest, Workload) and manifest.kind != "Pod":
            self.workloads[manifest.name] = manifest
        return self._add_pods(pods)

    def scale(self, workload: str, replicas: int) -> list[Pod]:
        """``kubectl scale``: add pods ``<name>-<i>`` for the missing indexes, or delete the
        highest ones; the add-ons (Endpoints, kube-proxy, DNS) follow. Returns the pods now."""
        w = self.workloads.get(workload)
        if w is None:
            raise K8sNetLabError(f"no Deployment or ReplicationController {workload!r}: "
                                 f"there are {', '.join(sorted(self.workloads)) or '(none)'}")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise SpecError(f"scale {workload}: replicas must be a whole number >= 0")
        owner = f"{w.kind}/{w.name}"
        mine = {p.spec.name: p for p in self.pods.values() if p.spec.owner == owner}
        wanted = {ps.name: ps for ps in w.pods(replicas + len(mine))}   # enough free indexes
        index = {name: i for i, name in enumerate(wanted)}
        keep = sorted(mine, key=lambda n: index.get(n, 1 << 30))[:replicas]
        for name in set(mine) - set(keep):
            self.delete_pod(mine[name].name)
        missing = replicas - len(keep)
        new = [ps for ps in wanted.values() if ps.name not in mine][:missing]
        if new:
            self._add_pods(new)
        self.workloads[workload] = dataclasses.replace(w, replicas=replicas)
        return sorted((p for p in self.pods.values() if p.spec.owner == owner), key=lambda p: index[p.name])

    def _add_pods(self, specs: list[PodSpec]) -> list[Pod]:
        assert self.state is not None
        pods = []
        for ps in specs:
            node_name = self.schedule(ps)
            pod = self._new_host(ps.host_name, Pod, spec=ps, ip=None)
            pod.node_name = node_name
            pod.container_id = secrets.token_hex(32)
            self.pods[ps.host_name] = pod
            with Netns(pod.netns, ps.host_name) as ns:
                ns.link_up("lo")   # what the runtime's loopback plugin does
            pods.append(pod)
        errors: list[str] = []
        self._parallel([(self._cni_add, p) for p in pods], errors, "CNI ADD")
        if errors:
            for p in pods:  # a failed batch leaves none of its pods behind
                if p.name in self.pods:
                    self.delete_pod(p.name)
            raise K8sNetLabError(errors[0])
        logs = self.state.path / "logs"
        logs.mkdir(exist_ok=True)
        for pod in pods:
            for c in pod.spec.containers:
                pod.start_container(c, logs)
        self._wait_ready(pods)
        for addon in self.addons:
            addon.pods_added(pods)
        return pods

    def _wait_ready(self, pods: list[Pod], timeout: float = 10.0) -> None:
        """Wait until every declared TCP containerPort listens (a readiness probe), bounded."""
        deadline = time.monotonic() + timeout
        for pod in pods:
            for c in pod.spec.containers:
                cont = pod.containers.get(c.name)
                for port in (p.container_port for p in c.ports if p.protocol == "TCP"):
                    while cont is not None and not proc.listening(cont.pid, port):
                        if not cont.running():
                            raise K8sNetLabError(f"container {c.name} of pod {pod.name} exited "
                                                 f"(status {cont.process.returncode}); see {cont.log_path}")
                        if time.monotonic() > deadline:
                            log.warning("pod %s: port %d not listening after %.0f s", pod.name, port, timeout)
                            return
                        time.sleep(0.02)

    def _runtime_conf(self, pod: Pod) -> RuntimeConf:
        s = pod.spec
        return RuntimeConf(pod.container_id, pod.netns, naming.POD_IFNAME,
                           {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": s.namespace,
                            "K8S_POD_NAME": s.name, "K8S_POD_INFRA_CONTAINER_ID": pod.container_id})

    def _cni_add(self, pod: Pod) -> None:
        node = pod.node_name or ""
        try:
            result = self._runtimes[node].add(self._netconfs[node], self._runtime_conf(pod))
        except K8sNetLabError as e:
            raise K8sNetLabError(f"CNI ADD of pod {pod.name} on {node} failed: {e}") from None
        cidr = result.sandbox_ip(naming.POD_IFNAME)
        if cidr is None:
            raise K8sNetLabError(f"CNI ADD of pod {pod.name} returned no address")
        pod.result = result
        pod.attach_interface(naming.POD_IFNAME, cidr)
        self.mode.pod_added(pod)

    def _cni_del(self, pod: Pod) -> None:
        node = pod.node_name or ""
        if node in self._runtimes:
            self._runtimes[node].delete(self._netconfs[node], self._runtime_conf(pod))
        pod.result = None

    def check_pod(self, name: str) -> None:
        """CNI CHECK for one pod (raises CNIError when its wiring is not as ADD left it)."""
        pod = self.pods[name]
        node = pod.node_name or ""
        self._runtimes[node].check(self._netconfs[node], self._runtime_conf(pod))

    def delete_pod(self, name: str) -> None:
        pod = self.pods.get(name)
        if pod is None:
            raise K8sNetLabError(f"no pod {name!r}: pods are {', '.join(sorted(self.pods)) or '(none)'}")
        for addon in self.addons:
            addon.pod_removing(pod)
        pod.stop_containers()
        try:
            if pod.result is not None:
                self.mode.pod_removed(pod)
                self._cni_del(pod)
        finally:
            self._kill_in(pod)
            del self.pods[name]
            assert self.net is not None
            self.net.delHost(pod)

    def label_pod(self, name: str, labels: dict[str, str | None]) -> dict[str, str]:
        """``kubectl label pod``: set labels of a running pod (a value None removes the key);
        the add-ons follow (network policies select by labels). Returns the new labels."""
        pod = self.pods.get(name)
        if pod is None:
            raise K8sNetLabError(f"no pod {name!r}: pods are {', '.join(sorted(self.pods)) or '(none)'}")
        new = {**pod.spec.labels, **{k: str(v) for k, v in labels.items() if v is not None}}
        new = {k: v for k, v in new.items() if labels.get(k, "") is not None}
        manifests._str_map(new, f"pod {name} labels")
        pod.spec = dataclasses.replace(pod.spec, labels=new)
        for addon in self.addons:
            addon.pod_updated(pod)
        return new

    def label_namespace(self, namespace: str, labels: dict[str, str | None]) -> dict[str, str]:
        """``kubectl label namespace`` (namespaces are the policy add-on's, see k8snetlab.policy)."""
        policies = getattr(self, "policies", None)
        if policies is None:
            raise K8sNetLabError("namespaces are kept by the network policy add-on, which is not running")
        return policies.label_namespace(namespace, labels)

    def _parallel(self, jobs: list[tuple[Any, Any]], errors: list[str], what: str) -> None:
        if not jobs:
            return
        workers = min(8, len(jobs))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cni") as ex:
            futs = {ex.submit(fn, arg): arg for fn, arg in jobs}
            for f in concurrent.futures.as_completed(futs):
                e = f.exception()
                if e is not None:
                    errors.append(str(e))
                    log.warning("%s for %s: %s", what, futs[f].name, e)

    # -- processes --------------------------------------------------------------------------------
    def _kill_in(self, *hosts: NetnsHost) -> None:
        """Stop every process in the hosts' namespaces except their shells (Mininet stops those)."""
        inodes, shells = set(), set()
        for h in hosts:
            try:
                inodes.add(os.stat(h.netns).st_ino)
                shells.add(h.pid)
            except OSError:
                continue
        for pid in cleanup.processes_in_netns(inodes):
            if pid not in shells:
                cleanup.kill_pid(pid, proc.start_time(pid), grace=0.5)

    # -- conveniences ----------------------------------------------------------------------------
    def addon(self, name: str) -> addonmod.Addon | None:
        """The running add-on of that name (``services``...), None when the cluster has none."""
        return next((a for a in self.addons if a.name == name), None)

    @property
    def services(self) -> Any:
        """The Services add-on (``k8snetlab.services.addon.ServicesAddon``): kube-proxy,
        Endpoints, DNS, load balancer; None when the cluster file asks for no Services."""
        return self.addon("services")

    @property
    def switches(self) -> dict[str, Any]:
        """The underlay's switches (Mininet objects) by their cluster-file name: the subnet's
        name, or the names in underlay.switches."""
        return dict(self._switches)

    def pod_ips(self) -> dict[str, str]:
        return {n: p.ip or "" for n, p in self.pods.items()}

    def describe(self) -> list[str]:
        lines = [f"cluster {self.spec.name}: cni {self.spec.cni.type} (datapath {self.mode.datapath}, "
                 f"pod MTU {self.mode.mtu})"]
        if self.ovs is not None:
            lines.append(f"  {self.ovs.describe()}")
        for n in self.nodes.values():
            lines.append(f"  node {n.name:<10} {n.spec.ip!s:<16} podCIDR {n.spec.pod_cidr}")
            for p in sorted((p for p in self.pods.values() if p.node_name == n.name), key=lambda p: p.name):
                cont = ", ".join(p.containers) or "-"
                lines.append(f"    pod {p.name:<14} {p.ip or '?':<16} containers: {cont}")
        for r in self.routers.values():
            lines.append(f"  router {r.name}")
        for h in self.hosts.values():
            lines.append(f"  host   {h.name:<10} {h.IP()}")
        return lines

    def cli(self) -> None:
        """Mininet's CLI, with pod and node names as hosts (``web-0 ping web-1``)."""
        from mininet.cli import CLI
        from mininet.log import output
        mode = self.mode

        class ClusterCLI(CLI):
            identchars = CLI.identchars + "-."  # Kubernetes names hold dashes; a.x: pod a of namespace x

            def do_bgp(self, line: str) -> None:
                """bgp: BGP sessions and routes of every node, asked of its speaker (cni bgp)"""
                table = getattr(mode, "status_table", None)
                output((table() if table else f"cni {mode.name} runs no BGP speakers") + "\n")

        assert self.net is not None
        setLogLevel("output")   # the CLI prints command output at this level
        try:
            ClusterCLI(self.net)
        finally:
            setLogLevel("error")

    # -- CNI plugin executables -------------------------------------------------------------------
    def _write_cni_bin(self) -> None:
        """Our plugins as CNI executables named by type, in this cluster's CNI_PATH."""
        from cni_plugins import PLUGINS
        assert self.state is not None
        self.state.cni_bin.mkdir(parents=True, exist_ok=True)
        for ptype in PLUGINS.names():
            module = PLUGINS.entry(ptype).module
            path = self.state.cni_bin / ptype
            path.write_text(f"#!{sys.executable}\n"
                            "import sys\n"
                            f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
                            f"import {module} as plugin\n"
                            "from cni_plugins import skel\n"
                            "skel.main(plugin)\n")
            path.chmod(0o755)
