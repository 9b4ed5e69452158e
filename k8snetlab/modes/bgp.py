"""``bgp`` (Calico BGP): the Calico pod layout, routes between nodes learned by BGP.

Pod side: the ``calico`` plugin, as in ``ipip`` (``cali*`` veth, pod ``/32``, default via
``169.254.1.1`` answered by proxy ARP), but with MTU 1500: nothing is encapsulated.

Routes between nodes, options and faults: :class:`BgpMode`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bgp import SPEAKERS, plan as bgpplan
from ..bgp.status import SpeakerStatus, table
from .. import signals
from ..errors import K8sNetLabError, SpecError
from ..netutil import Netns
from ..options import opt
from .ipip import CalicoMode

if TYPE_CHECKING:  # pragma: no cover
    from ..bgp.speakers import Speaker
    from ..pod import NodeHost
    from ..clusterspec import ClusterSpec

log = logging.getLogger(__name__)

MAX_AS = 4294967295
CONVERGE_TIMEOUT = 15.0     # start-up: how long to wait for every node to have every pod route
START_TIMEOUT = 10.0        # start-up: every speaker answers its control channel within this
START_PER_SPEAKER = 0.1     # ... plus this per speaker started at once (they share the CPUs)


@dataclass
class BgpOptions:
    as_number: int = opt(bgpplan.DEFAULT_AS, key="asNumber", min=1, max=MAX_AS,
                         help="the nodes' AS number (Calico's asNumber), 1..4294967295")
    topology: str = opt("mesh", choices=("mesh", "route-reflector"),
                        help="node-to-node full mesh, or clients peering with route reflectors")
    reflectors: list[str] = opt([], help="nodes acting as route reflectors (topology route-reflector)")
    speaker: str = opt("bird", choices=SPEAKERS, help="the BGP daemon of every node")
    speakers: dict[str, str] = opt({}, help="per-node speaker for mixed clusters, e.g. {node3: exabgp}")
    hold_time: int = opt(90, key="holdTime", min=3, max=65535,
                         help="BGP hold time in seconds (BIRD's minimum is 3); keepalive is a third")
    peer_with_tor: bool = opt(False, key="peerWithToR",
                              help="routed underlays: nodes peer by eBGP with their top-of-rack router")
    tor_as_numbers: dict[str, int] = opt({}, key="torASNumbers",
                                         help="AS of each underlay router, e.g. {tor-a: 65001}; default 65001, 65002...")
    route_refresh_interval: float = opt(90.0, key="routeRefreshInterval", min=0.1, max=86400,
                                        help="seconds between Felix-style refreshes of the local pod "
                                             "routes (routes between nodes are the speakers')")


class BgpMode(CalicoMode):
    """Calico BGP: plain routed pod traffic, routes from BIRD or ExaBGP speakers on every node.

    Between nodes there are no static routes at all. Each node runs a real BGP speaker in its
    namespace (what calico-node's BIRD is): it announces the node's pod CIDR (Calico's block; the
    node itself keeps a blackhole route for it, more specific ``/32`` pod routes win) and installs
    what it learns into the node's FIB: ``proto bird`` for BIRD, ``proto bgp`` for our ExaBGP
    installer, so the two can be told apart in ``ip route``. Packets then cross the underlay as
    plain routed IP, also across routers when the nodes peer with their top-of-rack routers.

    Options (``cni.bgp``; see :class:`BgpOptions`): ``asNumber``, ``topology: mesh |
    route-reflector`` with ``reflectors``, ``speaker: bird | exabgp`` and per-node ``speakers``,
    ``holdTime``, ``peerWithToR`` with ``torASNumbers``. Who peers with whom is decided in
    :mod:`k8snetlab.bgp.plan`; the daemons are driven by :mod:`k8snetlab.bgp.speakers`.

    For tests and experiments the mode also offers ``stop_speaker`` / ``start_speaker`` (faults),
    ``start_speakers`` (when the cluster was started with ``defer_start``) and ``status()``: each
    speaker's sessions and routes, asked of the speaker itself.
    """

    name = "bgp"
    Options = BgpOptions
    pod_mtu = 1500

    def __init__(self, cluster: Any, options: BgpOptions):
        super().__init__(cluster, options)
        self.speakers: dict[str, "Speaker"] = {}    # node and router name -> driver
        self.defer_start = False                    # True: start_node configures, start_speakers() starts
        self.last_converge_s: float | None = None
        self._plan_key: tuple[Any, ...] | None = None
        self._plan: bgpplan.BgpPlan | None = None
        self._stopped: set[str] = set()
        self._followed: tuple[Any, ...] | None = None   # the plan key the speakers were last fitted to

    # -- description (no root) ---------------------------------------------------------------------
    @classmethod
    def validate(cls, spec: "ClusterSpec") -> None:
        o: BgpOptions = spec.cni.options
        where = f"{spec.source}: cni.bgp"
        nodes = [n.name for n in spec.nodes]
        routers = [r.name for r in spec.underlay.routers]
        for node, sp in o.speakers.items():
            if node not in nodes:
                raise SpecError(f"{where}.speakers: {node!r} is not a node: nodes are {', '.join(nodes)}")
            if sp not in SPEAKERS:
                raise SpecError(f"{where}.speakers.{node}: unknown speaker {sp!r}: use one of "
                                f"{', '.join(SPEAKERS.names())}")
        subnets = list(dict.fromkeys(n.subnet for n in spec.nodes))
        if o.peer_with_tor:
            if len(subnets) == 1:
                raise SpecError(f"{where}.peerWithToR: every node is on subnet {subnets[0]} (a flat underlay): "
                                "there is no top-of-rack router to peer with; remove peerWithToR and the "
                                "nodes peer with each other")
            if o.topology != "mesh" or o.reflectors:
                raise SpecError(f"{where}: peerWithToR replaces the node-to-node sessions: remove topology "
                                "and reflectors (or peerWithToR)")
            for router, asn in o.tor_as_numbers.items():
                if router not in routers:
                    raise SpecError(f"{where}.torASNumbers: {router!r} is not an underlay router: routers are "
                                    f"{', '.join(routers) or '(none)'}")
                if not isinstance(asn, int) or isinstance(asn, bool) or not 1 <= asn <= MAX_AS:
                    raise SpecError(f"{where}.torASNumbers.{router}: {asn!r} is out of range 1..{MAX_AS}")
                if asn == o.as_number:
                    raise SpecError(f"{where}.torASNumbers.{router}: {asn} is the nodes' asNumber, but nodes "
                                    "peer with their ToR by eBGP: give the router an AS of its own")
            return
        if len(subnets) > 1:
            a = next(n for n in spec.nodes if n.subnet == subnets[0])
            b = next(n for n in spec.nodes if n.subnet == subnets[1])
            raise SpecError(f"{where}: {a.name} is on subnet {a.subnet} and {b.name} on {b.subnet}, so nodes "
                            "are not next hops for each other: set peerWithToR: true (nodes peer with their "
                            "top-of-rack router) or use ipip or vxlan")
        if o.tor_as_numbers:
            raise SpecError(f"{where}.torASNumbers: only used with peerWithToR: remove it")
        if o.topology == "mesh":
            if o.reflectors:
                raise SpecError(f"{where}.reflectors: only used with topology: route-reflector (topology is mesh)")
            _check_neighbours(where, len(nodes), bgpplan.mesh_sessions(len(nodes)),
                              "use topology: route-reflector with reflectors: "
                              f"[{', '.join(nodes[:2])}] (Calico's advice beyond ~100 nodes)")
            return
        if not o.reflectors:
            raise SpecError(f"{where}.reflectors: topology route-reflector needs at least one reflector: "
                            f"name one or more nodes, e.g. reflectors: [{nodes[0]}]")
        seen = set()
        for r in o.reflectors:
            if r not in nodes:
                raise SpecError(f"{where}.reflectors: {r!r} is not a node: nodes are {', '.join(nodes)}")
            if r in seen:
                raise SpecError(f"{where}.reflectors: {r!r} is listed twice")
            seen.add(r)
            if bgpplan.speaker_of(r, o) != "bird":
                raise SpecError(f"{where}.reflectors: {r} runs exabgp, which does not reflect routes: "
                                "reflectors run bird")
        _check_neighbours(where, len(nodes), bgpplan.rr_sessions(len(nodes), len(o.reflectors)),
                          "use fewer reflectors")

    @property
    def datapath(self) -> str:
        return "kernel"

    def plan(self) -> bgpplan.BgpPlan:
        """The session plan for the nodes running now (recomputed when nodes join or leave)."""
        key = (id(self.cluster.spec), tuple(self.cluster.nodes))
        if self._plan is None or key != self._plan_key:
            self._plan = bgpplan.build(self.cluster.spec, self.options, self.cluster.nodes)
            self._plan_key = key
        return self._plan

    # -- node agent --------------------------------------------------------------------------------
    def prepare(self, first_node: "NodeHost") -> None:
        """Check the daemons are installed; configure the underlay routers' BIRD (peerWithToR),
        started with the nodes' speakers."""
        for kind in sorted({s.speaker for s in self.plan().speakers.values()}):
            SPEAKERS.get(kind).check_tools()
        for sp in self.plan().routers():
            router = self.cluster.routers[sp.name]
            self._driver(sp, router, self._router_dir(sp.name)).configure()

    def start_node(self, node: "NodeHost", ns: Netns) -> None:
        super().start_node(node, ns)
        drv = self._driver(self.plan().speakers[node.name], node, Path(node.state_dir))
        drv.configure()
        self._stopped.discard(node.name)
        if self.defer_start or not all(n in self.speakers for n in self.cluster.nodes):
            return
        # the last node is configured (or a node joined): start what is not running, all at once,
        # and, like a readiness gate, return once every node has every pod route
        self._follow_plan()     # a joining node: the others learn of their new peer first
        self.start_speakers([n for n, d in self.speakers.items() if d.started_at is None])
        took = self.wait_converged(CONVERGE_TIMEOUT)
        self.last_converge_s = took     # speakers started until every node has every pod route
        if took is None:
            log.warning("bgp: routes not everywhere after %.0f s: %s; see 'k8snetlab bgp status'",
                        CONVERGE_TIMEOUT, _lacking(self.missing_routes()))
        else:
            log.info("bgp: every node has every pod route (%.2f s)", took)

    def add_peer(self, node: "NodeHost", ns: Netns, peer: "NodeHost") -> None:
        """No route: BGP brings it. A new peer means new sessions: reconfigure the speakers."""
        self._follow_plan()

    def peers_to_repair(self, node: "NodeHost", ns: Netns, peers: list["NodeHost"]) -> list["NodeHost"]:
        """None: routes to other nodes are the BGP speakers' (BIRD rescans the kernel table)."""
        return []

    def remove_peer(self, node: "NodeHost", ns: Netns, peer: "NodeHost") -> None:
        self._follow_plan()

    def stop_all(self) -> None:
        """A cluster's teardown: every speaker (routers' too) stopped at once, before each
        node's stop_node (which then finds its speaker gone)."""
        from ..bgp.speakers import stop_all
        stop_all(list(self.speakers.values()))

    def stop_node(self, node: "NodeHost") -> None:
        drv = self.speakers.pop(node.name, None)
        if drv is not None:
            drv.stop()
            drv.forget()
        self._stopped.add(node.name)
        if set(self.cluster.nodes) <= self._stopped:       # the last node: the routers go too
            for name in [n for n in self.speakers if n in self.cluster.routers]:
                drv = self.speakers.pop(name)
                drv.stop()
                drv.forget()

    def _follow_plan(self) -> None:
        """Give every running speaker whose peers changed its new configuration (cheap when
        nothing changed: called once per pair of nodes)."""
        plan = self.plan()
        if self._plan_key == self._followed:
            return          # the node set has not changed since the last time
        self._followed = self._plan_key
        for name, drv in self.speakers.items():
            sp = plan.speakers.get(name)
            if sp is not None and sp.peer_names() != drv.configured_peers:
                if drv.configure(sp):
                    drv.reload()

    def _driver(self, sp: bgpplan.SpeakerPlan, host: Any, state_dir: Path) -> "Speaker":
        drv = self.speakers.get(sp.name)
        if drv is None or drv.kind != sp.speaker:
            drv = SPEAKERS.get(sp.speaker)(sp, host, state_dir)
            self.speakers[sp.name] = drv
        return drv

    def _router_dir(self, name: str) -> Path:
        assert self.cluster.state is not None
        d = self.cluster.state.path / "routers" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- faults, experiments, status ---------------------------------------------------------------
    def speaker(self, name: str) -> "Speaker":
        drv = self.speakers.get(name)
        if drv is None:
            raise K8sNetLabError(f"no BGP speaker on {name!r}: speakers run on "
                                 f"{', '.join(sorted(self.speakers)) or '(none)'}")
        return drv

    def stop_speaker(self, name: str, graceful: bool = True) -> None:
        """Stop the speaker of a node (or router): graceful sends a BGP Cease to its peers,
        otherwise it is killed and the peers see the TCP session drop."""
        self.speaker(name).stop(graceful=graceful)
        log.info("bgp: speaker on %s stopped (%s)", name, "graceful" if graceful else "killed")

    def start_speaker(self, name: str, wait: bool = True) -> None:
        self.speaker(name).start(wait=wait)
        log.info("bgp: speaker on %s started", name)

    def start_speakers(self, names: list[str] | None = None, wait: bool = True) -> None:
        """Start the speakers not running (all at once, then wait for each control channel).

        Highest router ID first: in each session the lower address connects and the higher one
        listens (plan.Peer.passive), so every connect finds its peer listening instead of
        waiting out BGP's connect-retry timer."""
        todo = [self.speakers[n] for n in (list(self.speakers) if names is None else names)
                if not self.speakers[n].running()]
        todo.sort(key=lambda d: bgpplan.ip_key(d.plan.router_id), reverse=True)
        for drv in todo:
            drv.start(wait=False)
        if wait:        # one deadline for all: each speaker's own would add up
            deadline = time.monotonic() + START_TIMEOUT + START_PER_SPEAKER * len(todo)
            for drv in todo:
                drv.wait_ready(max(0.0, deadline - time.monotonic()))

    def missing_routes(self) -> dict[str, list[str]]:
        """Per node with a running speaker: the pod CIDRs of the other such nodes that its
        kernel FIB lacks (read from the FIB itself, :mod:`k8snetlab.bgp.fib`)."""
        from ..bgp import fib
        want = {n: str(h.spec.pod_cidr) for n, h in self.cluster.nodes.items()
                if n in self.speakers and self.speakers[n].running()}
        out = {}
        for name in want:
            have = fib.prefixes(self.cluster.nodes[name].pid)
            lacking = [cidr for other, cidr in want.items() if other != name and cidr not in have]
            if lacking:
                out[name] = lacking
        return out

    def wait_converged(self, timeout: float = CONVERGE_TIMEOUT, interval: float = 0.05) -> float | None:
        """Wait until every node has every pod route; the seconds it took, None on timeout."""
        t0 = time.monotonic()
        while self.missing_routes():
            signals.poll()          # a stop signal during a start interrupts the wait
            if time.monotonic() - t0 > timeout:
                return None
            time.sleep(interval)
        return time.monotonic() - t0

    def status(self, names: list[str] | None = None) -> dict[str, SpeakerStatus]:
        """Sessions and routes of each speaker, asked of the speaker itself."""
        from ..bgp.speakers import query
        out = {}
        order = [n for n in self.cluster.nodes if n in self.speakers] + \
                [n for n in self.speakers if n not in self.cluster.nodes]
        for name in names or order:
            drv = self.speakers.get(name)
            out[name] = query(drv.descriptor()) if drv else SpeakerStatus(name, "?", False, error="no speaker")
        return out

    def status_table(self) -> str:
        return table(list(self.status().values()))


def _check_neighbours(where: str, nodes: int, sessions: int, fix: str) -> None:
    """Refuse sessions whose ARP entries the kernel's neighbour table cannot hold.

    The table is one for the whole machine (every namespace, other clusters too). Past its
    limit each new entry is refused after a forced garbage collection of the table: sessions
    cannot connect or lose their peer's address, flap, and 200 BIRDs retrying a 200-node
    mesh (39,800 entries against 16,384) kept both cores busy for a quarter of an hour while
    the runtime starved."""
    need, limit = bgpplan.neighbour_entries(sessions), bgpplan.neighbour_limit()
    if limit is not None and need > limit:
        raise SpecError(f"{where}: {nodes} nodes make {sessions:,} BGP sessions, whose ends need "
                        f"{need:,} ARP entries, more than the kernel's neighbour table holds for the "
                        f"whole machine ({limit:,}, net.ipv4.neigh.default.gc_thresh3): {fix}")


def _lacking(missing: dict[str, list[str]]) -> str:
    items = [f"{node} lacks {', '.join(cidrs)}" for node, cidrs in missing.items()]
    return "; ".join(items[:3]) + (f"; and {len(items) - 3} more nodes" if len(items) > 3 else "")
