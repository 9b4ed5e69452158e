"""Shortest-path L2 fabric for underlays with loops: LLDP discovery, per-destination flows, reroute on link loss.

For an underlay of several switches with loops (two spines, several leaves, each leaf linked
to every spine), where a learning switch would flood a broadcast around the loop forever:
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque

from controllers import (App, CONFIG_DISPATCHER, DEAD_DISPATCHER, MAIN_DISPATCHER, add_flow, delete_flows,
                         ethernet, ether_types, export_state, ofp_event, ofproto_v1_3, packet, packet_out,
                         set_ev_cls, table_miss_to_controller, topology_event)

log = logging.getLogger("controllers.fabric")

COOKIE = 0xFAB
ADMIT_TABLE, FORWARD_TABLE = 0, 1
PRIO_HOST_SOURCE = 100       # table 0: known host on its edge port
PRIO_LINK_PORT = 90          # table 0: anything arriving over a link
PRIO_ROUTE = 100             # table 1: eth_dst -> port
DUPLICATE_WINDOW_S = 2.0     # a flooded packet seen again within this time, elsewhere, is a copy


class Fabric(App):
    """The fabric app: discovery, paths and failover as follows.

    - **Discovery.** The framework's topology service sends LLDP out of every switch port and
      reports the links it sees come back (``EventLinkAdd`` / ``EventLinkDelete``); a link is used
      once both of its directions are seen. A port whose carrier goes down (``OFPPortStatus``)
      removes its links at once, without waiting for the LLDP timeout.
    - **Hosts** (the nodes' ``eth0``, routers) are learned at *edge* ports (ports without a link)
      from the packets the controller sees.
    - **Unicast**: for every known host the app computes a shortest-path tree towards the host's
      switch (breadth-first, ties broken by the lowest datapath id, so the choice is stable) and
      installs ``eth_dst=host -> port towards it`` on every switch. Paths change only when the
      topology does: then every tree is recomputed and only the flows that differ are rewritten,
      which is the reroute (logged with the time it took).
    - **Broadcast and unknown destinations** never go out of a link port: the controller sends
      the packet itself out of every edge port of every switch. A loop cannot turn that into a
      storm. Before discovery has found a link, its ports look like edge ports; a copy coming
      back through such a port is recognised as a duplicate of a packet the controller sent
      (same bytes within ``DUPLICATE_WINDOW_S``, arriving elsewhere than the original) and
      dropped. A host's own retry (an ARP request resent after a second) arrives where the
      original did and is not a duplicate.

    Flow tables (cookie ``0xfab``): table 0 admits known sources on their edge port and anything
    arriving on a link port (then goto table 1); what it misses (a new source) goes to the
    controller. Table 1 forwards by destination MAC; a miss (broadcast, unknown destination)
    goes to the controller. The app writes its view (switches, links, hosts, counters) with
    :func:`controllers.export_state` so the runtime can wait for discovery and tests can read it.
    """
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dps: dict[int, object] = {}                       # dpid -> datapath
        self.links: set[tuple[int, int, int, int]] = set()     # directed (dpid, port, peer dpid, peer port)
        self.hosts: dict[str, tuple[int, int]] = {}            # MAC -> (dpid, port)
        self.routes: dict[tuple[int, str], int] = {}           # (dpid, MAC) -> output port installed
        self.link_port_flows: set[tuple[int, int]] = set()     # (dpid, port) with the table-0 link flow
        self.flooded: dict[bytes, tuple[float, int, int]] = {}  # packet digest -> (time, origin dpid, port)
        self.counters = {"packet_ins": 0, "floods": 0, "duplicates_dropped": 0, "reroutes": 0,
                         "flow_mods": 0}
        self.last_reroute_ms = 0.0

    # -- switches --------------------------------------------------------------------------------
    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def switch_features(self, ev):
        dp = ev.msg.datapath
        table_miss_to_controller(dp, ADMIT_TABLE)
        table_miss_to_controller(dp, FORWARD_TABLE)

    @set_ev_cls(ofp_event.EventOFPStateChange, [MAIN_DISPATCHER, DEAD_DISPATCHER])
    def state_change(self, ev):
        dp = ev.datapath
        if ev.state == MAIN_DISPATCHER and dp.id is not None:
            self.dps[dp.id] = dp
            log.info("switch %016x up, %d ports", dp.id, len(self._ports(dp)))
            self._changed(f"switch {dp.id:x} up")
        elif ev.state == DEAD_DISPATCHER and dp.id in self.dps and self.dps[dp.id] is dp:
            del self.dps[dp.id]
            self.links = {l for l in self.links if dp.id not in (l[0], l[2])}
            for mac in [m for m, (d, _) in self.hosts.items() if d == dp.id]:
                del self.hosts[mac]
            self.routes = {k: v for k, v in self.routes.items() if k[0] != dp.id}
            self.link_port_flows = {k for k in self.link_port_flows if k[0] != dp.id}
            log.info("switch %016x gone", dp.id)
            self._changed(f"switch {dp.id:x} gone")

    def _ports(self, dp) -> list[int]:
        """The switch's live physical ports (carrier up, not administratively down)."""
        ofp = dp.ofproto
        return sorted(no for no, p in dp.ports.items()
                      if no <= ofp.OFPP_MAX and not p.state & ofp.OFPPS_LINK_DOWN
                      and not p.config & ofp.OFPPC_PORT_DOWN)

    # -- links -----------------------------------------------------------------------------------
    @set_ev_cls(topology_event.EventLinkAdd)
    def link_add(self, ev):
        s, d = ev.link.src, ev.link.dst
        key = (s.dpid, s.port_no, d.dpid, d.port_no)
        if key not in self.links:
            self.links.add(key)
            if (d.dpid, d.port_no, s.dpid, s.port_no) in self.links:
                log.info("link %x:%d <-> %x:%d up", s.dpid, s.port_no, d.dpid, d.port_no)
                self._changed("link up")

    @set_ev_cls(topology_event.EventLinkDelete)
    def link_delete(self, ev):
        s, d = ev.link.src, ev.link.dst
        self._drop_links(lambda l: l == (s.dpid, s.port_no, d.dpid, d.port_no), "link gone (LLDP)")

    @set_ev_cls(ofp_event.EventOFPPortStatus, MAIN_DISPATCHER)
    def port_status(self, ev):
        msg = ev.msg
        dp, ofp, port = msg.datapath, msg.datapath.ofproto, msg.desc
        down = (msg.reason == ofp.OFPPR_DELETE or port.state & ofp.OFPPS_LINK_DOWN
                or port.config & ofp.OFPPC_PORT_DOWN)
        if not down:
            return
        at = (dp.id, port.port_no)
        self._drop_links(lambda l: at in ((l[0], l[1]), (l[2], l[3])), f"port {dp.id:x}:{port.port_no} down")
        if msg.reason == ofp.OFPPR_DELETE:
            for mac in [m for m, loc in self.hosts.items() if loc == at]:
                self._forget(mac)
                self._changed(f"host {mac} gone")

    def _drop_links(self, which, why: str) -> None:
        gone = {l for l in self.links if which(l)}
        if not gone:
            return
        t0 = time.monotonic()
        self.links -= gone
        for l in gone:    # the other direction of a broken link is broken too
            self.links.discard((l[2], l[3], l[0], l[1]))
        self.counters["reroutes"] += 1
        self._changed(why)
        self.last_reroute_ms = (time.monotonic() - t0) * 1000
        log.info("%s: %d link(s) removed, routes recomputed in %.1f ms", why, len(gone), self.last_reroute_ms)
        self._export()

    def _adjacency(self) -> dict[int, list[tuple[int, int, int]]]:
        """dpid -> [(own port, neighbour dpid, neighbour port)] over links seen both ways."""
        adj: dict[int, list[tuple[int, int, int]]] = {d: [] for d in self.dps}
        for a, pa, b, pb in self.links:
            if (b, pb, a, pa) in self.links and a in adj and b in adj:
                adj[a].append((pa, b, pb))
        for v in adj.values():
            v.sort()
        return adj

    # -- routes ----------------------------------------------------------------------------------
    def _changed(self, why: str) -> None:
        """The topology or the host set changed: bring every flow in line with it."""
        adj = self._adjacency()
        self._sync_link_ports(adj)
        for mac, (hd, hp) in self.hosts.items():
            towards = tree_towards(adj, hd)
            for dpid in self.dps:
                self._set_route(dpid, mac, hp if dpid == hd else towards.get(dpid))
        for (dpid, mac) in [k for k in self.routes if k[1] not in self.hosts]:
            self._set_route(dpid, mac, None)
        self._export()

    def _sync_link_ports(self, adj) -> None:
        want = {(a, pa) for a, nbrs in adj.items() for pa, _, _ in nbrs}
        for dpid, port in want - self.link_port_flows:
            dp = self.dps[dpid]
            add_flow(dp, PRIO_LINK_PORT, dp.ofproto_parser.OFPMatch(in_port=port), table=ADMIT_TABLE,
                     goto=FORWARD_TABLE, cookie=COOKIE)
            self.counters["flow_mods"] += 1
        for dpid, port in self.link_port_flows - want:
            dp = self.dps.get(dpid)
            if dp is not None:
                delete_flows(dp, dp.ofproto_parser.OFPMatch(in_port=port), table=ADMIT_TABLE,
                             cookie=COOKIE, priority=PRIO_LINK_PORT)
                self.counters["flow_mods"] += 1
        self.link_port_flows = want
        # a host "learned" on what turned out to be a link port was a copy: forget it
        for mac in [m for m, loc in self.hosts.items() if loc in want]:
            self._forget(mac)

    def _set_route(self, dpid: int, mac: str, port: int | None) -> None:
        if self.routes.get((dpid, mac)) == port:
            return
        dp = self.dps.get(dpid)
        if dp is None:
            self.routes.pop((dpid, mac), None)
            return
        parser = dp.ofproto_parser
        match = parser.OFPMatch(eth_dst=mac)
        if port is None:
            delete_flows(dp, match, table=FORWARD_TABLE, cookie=COOKIE, priority=PRIO_ROUTE)
            self.routes.pop((dpid, mac), None)
        else:
            add_flow(dp, PRIO_ROUTE, match, [parser.OFPActionOutput(port)], table=FORWARD_TABLE, cookie=COOKIE)
            self.routes[(dpid, mac)] = port
        self.counters["flow_mods"] += 1

    def _forget(self, mac: str) -> None:
        """Remove a host and its admission flow (its routes follow in _changed)."""
        dpid, port = self.hosts.pop(mac)
        dp = self.dps.get(dpid)
        if dp is not None:
            delete_flows(dp, dp.ofproto_parser.OFPMatch(in_port=port, eth_src=mac), table=ADMIT_TABLE,
                         cookie=COOKIE, priority=PRIO_HOST_SOURCE)

    def _learn(self, dp, mac: str, port: int) -> None:
        old = self.hosts.get(mac)
        if old == (dp.id, port):
            return
        parser = dp.ofproto_parser
        if old is not None:
            self._forget(mac)
        self.hosts[mac] = (dp.id, port)
        add_flow(dp, PRIO_HOST_SOURCE, parser.OFPMatch(in_port=port, eth_src=mac), table=ADMIT_TABLE,
                 goto=FORWARD_TABLE, cookie=COOKIE)
        log.info("host %s at %x:%d%s", mac, dp.id, port, f" (moved from {old[0]:x}:{old[1]})" if old else "")
        self._changed(f"host {mac}")

    # -- packets ---------------------------------------------------------------------------------
    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def packet_in(self, ev):
        msg = ev.msg
        dp = msg.datapath
        in_port = msg.match["in_port"]
        eth = packet.Packet(msg.data).get_protocol(ethernet.ethernet)
        if eth is None or eth.ethertype == ether_types.ETH_TYPE_LLDP:
            return   # the topology service's business
        self.counters["packet_ins"] += 1
        digest = hashlib.blake2b(msg.data, digest_size=16).digest()
        now = time.monotonic()
        seen = self.flooded.get(digest)
        if seen is not None and now - seen[0] < DUPLICATE_WINDOW_S and seen[1:] != (dp.id, in_port):
            self.counters["duplicates_dropped"] += 1
            return
        on_link = (dp.id, in_port) in self.link_port_flows
        if not on_link and not is_multicast(eth.src):
            self._learn(dp, eth.src, in_port)
        out = self.routes.get((dp.id, eth.dst))
        if out is not None and out != in_port:
            packet_out(dp, in_port, [dp.ofproto_parser.OFPActionOutput(out)], msg.data)
        else:
            self._flood_edges(dp.id, in_port, msg.data, digest, now)

    def _flood_edges(self, origin: int, in_port: int, data: bytes, digest: bytes, now: float) -> None:
        """Send a broadcast (or a frame for an unknown host) out of every edge port of every
        switch but the one it came in on: never across a link, so loops cannot amplify it."""
        self.counters["floods"] += 1
        self.flooded[digest] = (now, origin, in_port)
        if len(self.flooded) > 4096:
            self.flooded = {k: v for k, v in self.flooded.items() if now - v[0] < DUPLICATE_WINDOW_S}
        for dpid, dp in self.dps.items():
            ofp, parser = dp.ofproto, dp.ofproto_parser
            ports = [p for p in self._ports(dp) if (dpid, p) not in self.link_port_flows
                     and (dpid, p) != (origin, in_port)]
            if ports:
                packet_out(dp, in_port if dpid == origin else ofp.OFPP_CONTROLLER,
                           [parser.OFPActionOutput(p) for p in ports], data)

    # -- what the runtime and tests read ---------------------------------------------------------
    def _export(self) -> None:
        adj = self._adjacency()
        links = sorted({tuple(sorted([(a, pa), (b, pb)])) for a, nbrs in adj.items() for pa, b, pb in nbrs})
        export_state({
            "app": "fabric",
            "switches": sorted(self.dps),
            "links": [[a[0], a[1], b[0], b[1]] for a, b in links],
            "hosts": {m: list(loc) for m, loc in sorted(self.hosts.items())},
            "routes": len(self.routes),
            "last_reroute_ms": self.last_reroute_ms,
            **self.counters,
        })


def tree_towards(adj: dict[int, list[tuple[int, int, int]]], root: int) -> dict[int, int]:
    """For every switch that can reach ``root``: the port on it that leads one hop closer
    (breadth-first from the root; neighbours in (port, dpid) order, so ties break the same
    way every time). Pure: unit-tested without a framework."""
    out: dict[int, int] = {}
    seen = {root}
    queue = deque([root])
    while queue:
        x = queue.popleft()
        for _port_x, y, port_y in adj.get(x, ()):
            if y not in seen:
                seen.add(y)
                out[y] = port_y
                queue.append(y)
    return out


def is_multicast(mac: str) -> bool:
    return int(mac.split(":")[0], 16) & 1 == 1
