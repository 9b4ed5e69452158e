"""Who peers with whom: the BGP session plan of a cluster, as plain data.

Calico's BGP mode needs no static routes between nodes: every node runs a BGP speaker that
announces the node's pod CIDR (its IPAM block) and installs what the others announce. This
module decides the sessions from the cluster spec and the ``cni.bgp`` options, before
anything runs, so the plan can be unit-tested and the session counts checked against the
formulas without root:
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..clusterspec import ClusterSpec

DEFAULT_AS = 64512                 # Calico's default node AS (private range)
FIRST_TOR_AS = 65001               # routers get 65001, 65002, ... unless torASNumbers says otherwise
RR_CLUSTER_ID = "244.0.0.1"        # Calico's example routeReflectorClusterID, shared by all reflectors

# roles of a speaker
NODE, REFLECTOR, ROUTER = "node", "reflector", "router"
# kinds of a session, as they show in the peer list
MESH, RR, TOR, FABRIC = "mesh", "route-reflector", "tor", "fabric"


@dataclass(frozen=True)
class Peer:
    """One session, seen from one side."""
    name: str               # the peer's node or router name
    address: str            # the peer's address (the session's remote end)
    local_address: str      # our address on the shared subnet (the session's source)
    local_as: int
    peer_as: int
    kind: str               # mesh | route-reflector | tor | fabric
    rr_client: bool = False       # we reflect routes to this peer (we are its reflector)
    allow_local_as: bool = False  # accept paths holding our own AS once (node <- ToR)

    @property
    def ebgp(self) -> bool:
        return self.local_as != self.peer_as

    @property
    def passive(self) -> bool:
        """Only the side with the lower address opens the TCP connection (as Calico's mesh
        does): when both connect at once, BGP's collision resolution drops one connection
        and the speakers back off for seconds, which dominated a 50-node mesh's start."""
        return ip_key(self.local_address) > ip_key(self.address)


@dataclass(frozen=True)
class SpeakerPlan:
    """One speaker: its identity, what it announces and its sessions."""
    name: str
    role: str                        # node | reflector | router
    speaker: str                     # bird | exabgp
    router_id: str
    asn: int
    announce: tuple[str, ...]        # CIDRs this speaker originates (the node's pod CIDR)
    peers: tuple[Peer, ...]
    hold_time: int
    rr_cluster_id: str | None = None

    @property
    def keepalive(self) -> int:
        """Keepalive = hold time / 3, as BGP suggests (never below 1 s)."""
        return max(1, self.hold_time // 3)

    @property
    def exports_learned(self) -> bool:
        """Reflectors and routers pass on what they learn; plain nodes announce their own only."""
        return self.role in (REFLECTOR, ROUTER)

    def peer_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.peers)


@dataclass(frozen=True)
class BgpPlan:
    speakers: dict[str, SpeakerPlan] = field(hash=False)
    topology: str = "mesh"

    def sessions(self) -> set[frozenset[str]]:
        """Every session once, as the pair of speaker names."""
        return {frozenset((s.name, p.name)) for s in self.speakers.values() for p in s.peers}

    def nodes(self) -> list[SpeakerPlan]:
        return [s for s in self.speakers.values() if s.role != ROUTER]

    def routers(self) -> list[SpeakerPlan]:
        return [s for s in self.speakers.values() if s.role == ROUTER]


def mesh_sessions(n: int) -> int:
    """Sessions of a full mesh of ``n`` nodes."""
    return n * (n - 1) // 2


def rr_sessions(n: int, reflectors: int) -> int:
    """Sessions with ``reflectors`` of ``n`` nodes acting as route reflectors: each client to
    each reflector, plus the reflectors among themselves."""
    r = min(reflectors, n)
    return (n - r) * r + r * (r - 1) // 2


NEIGH_LIMIT_SYSCTL = "/proc/sys/net/ipv4/neigh/default/gc_thresh3"


def neighbour_entries(sessions: int) -> int:
    """ARP entries the sessions hold: each end resolves the other (on a flat underlay every
    peer is on-link), ``2 * sessions`` in all. The kernel's neighbour table is one for the
    whole machine, all namespaces together."""
    return 2 * sessions


def neighbour_limit() -> int | None:
    """How many neighbour entries the kernel keeps for the whole machine (``gc_thresh3``:
    past it a new entry is refused, "neighbor table overflow"); None if unreadable."""
    try:
        with open(NEIGH_LIMIT_SYSCTL) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def tor_as_numbers(spec: "ClusterSpec", configured: dict[str, int]) -> dict[str, int]:
    """The AS of every underlay router: ``torASNumbers`` where given, else 65001, 65002, ...
    in the order of ``underlay.routers``, skipping numbers already taken."""
    taken = set(configured.values())
    out, nxt = {}, FIRST_TOR_AS
    for r in spec.underlay.routers:
        if r.name in configured:
            out[r.name] = configured[r.name]
            continue
        while nxt in taken:
            nxt += 1
        out[r.name] = nxt
        taken.add(nxt)
    return out


def speaker_of(node: str, options: Any) -> str:
    return options.speakers.get(node, options.speaker)


def build(spec: "ClusterSpec", options: Any, node_names: Iterable[str] | None = None) -> BgpPlan:
    """The plan for ``spec`` (only the nodes in ``node_names`` when given: the running ones).

    - ``mesh`` (Calico's ``nodeToNodeMeshEnabled``): every node peers with every other node over
      iBGP, N(N-1)/2 sessions.
    - ``route-reflector``: clients peer only with the reflectors (iBGP, the reflectors mark them
      ``rr client``); reflectors peer with each other as ordinary iBGP peers and share one
      cluster ID, so a route reflected by one is not reflected again by the other.
      (N-R)*R + R(R-1)/2 sessions for R reflectors.
    - ``peerWithToR`` (routed underlays): each node peers by eBGP with its top-of-rack router
      (the router holding its subnet's gateway address); each router has an AS of its own (one
      per rack) and peers with the routers it shares a subnet with. A route then crosses
      node -> ToR -> ToR -> node and carries the nodes' AS twice, so the nodes accept their own
      AS once in a path from their ToR (BIRD ``allow local as``, Cisco's ``allowas-in``).

    In every session only the side with the lower address connects; the other waits (``passive``).

    Next hops stay the originating node's address wherever it is on-link (iBGP keeps it, a
    reflector does not change it, an eBGP router passes on a third-party next hop on a shared
    subnet), so pod traffic is plain routed IP with no encapsulation.
    """
    wanted = None if node_names is None else set(node_names)
    nodes = [n for n in spec.nodes if wanted is None or n.name in wanted]
    asn, hold = options.as_number, options.hold_time
    peers: dict[str, list[Peer]] = {n.name: [] for n in nodes}
    roles = {n.name: NODE for n in nodes}
    topology = "tor" if options.peer_with_tor else options.topology

    def pair(a: Any, b: Any, kind: str, a_reflects_b: bool = False) -> None:
        peers[a.name].append(Peer(b.name, str(b.ip), str(a.ip), asn, asn, kind, rr_client=a_reflects_b))
        peers[b.name].append(Peer(a.name, str(a.ip), str(b.ip), asn, asn, kind))

    speakers: dict[str, SpeakerPlan] = {}
    if options.peer_with_tor:
        speakers.update(_tor_plan(spec, options, nodes, peers))
    elif options.topology == "mesh":
        for i, a in enumerate(nodes):
            for b in nodes[i + 1:]:
                pair(a, b, MESH)
    else:
        rrs = [n for n in nodes if n.name in options.reflectors]
        for r in rrs:
            roles[r.name] = REFLECTOR
        for i, r in enumerate(rrs):
            for other in rrs[i + 1:]:
                pair(r, other, RR)
            for client in nodes:
                if client.name not in options.reflectors:
                    pair(r, client, RR, a_reflects_b=True)
    for n in nodes:
        role = roles[n.name]
        speakers[n.name] = SpeakerPlan(
            n.name, role, speaker_of(n.name, options), str(n.ip), asn, (str(n.pod_cidr),),
            tuple(sorted(peers[n.name], key=lambda p: ip_key(p.address))), hold,
            RR_CLUSTER_ID if role == REFLECTOR else None)
    return BgpPlan(speakers, topology)


def _tor_plan(spec: "ClusterSpec", options: Any, nodes: list[Any],
              peers: dict[str, list[Peer]]) -> dict[str, SpeakerPlan]:
    """Nodes <-> their ToR (eBGP), routers <-> routers on shared subnets (eBGP)."""
    asn = options.as_number
    router_as = tor_as_numbers(spec, options.tor_as_numbers)
    rpeers: dict[str, list[Peer]] = {r.name: [] for r in spec.underlay.routers}
    gateways = {(subnet, ip): r for r in spec.underlay.routers for subnet, ip in r.interfaces}
    for n in nodes:
        gw = spec.underlay.subnet(n.subnet).gateway
        tor = gateways.get((n.subnet, gw))
        if tor is None:   # refused by the mode's validate(); kept safe for direct callers
            continue
        peers[n.name].append(Peer(tor.name, str(gw), str(n.ip), asn, router_as[tor.name], TOR,
                                  allow_local_as=True))
        rpeers[tor.name].append(Peer(n.name, str(n.ip), str(gw), router_as[tor.name], asn, TOR))
    routers = list(spec.underlay.routers)
    for i, a in enumerate(routers):
        for b in routers[i + 1:]:
            for subnet, a_ip in a.interfaces:
                b_ip = dict(b.interfaces).get(subnet)
                if b_ip is None:
                    continue
                rpeers[a.name].append(Peer(b.name, str(b_ip), str(a_ip), router_as[a.name],
                                           router_as[b.name], FABRIC))
                rpeers[b.name].append(Peer(a.name, str(a_ip), str(b_ip), router_as[b.name],
                                           router_as[a.name], FABRIC))
    out = {}
    for r in routers:
        router_id = str(min((ip for _, ip in r.interfaces), key=lambda ip: int(ip)))
        out[r.name] = SpeakerPlan(r.name, ROUTER, "bird", router_id, router_as[r.name], (),
                                  tuple(sorted(rpeers[r.name], key=lambda p: ip_key(p.address))),
                                  options.hold_time)
    return out


def ip_key(addr: str) -> tuple[int, ...]:
    """Sort key of a dotted IPv4 address."""
    return tuple(int(x) for x in addr.split("."))
