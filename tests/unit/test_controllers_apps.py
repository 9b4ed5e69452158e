"""The controller apps' decisions, driven by hand-made OpenFlow events (no switch, no root).

A few fake datapaths stand in for Open vSwitch: they record what the app sends, and a small
simulator delivers the app's packet-outs over the fabric's links, as the switches would
before the app has installed any flow. That is enough to show the properties users rely on:
a broadcast on a looped fabric reaches every host once and dies out (no storm), also before
the links are discovered; unicast follows shortest paths and moves when a link goes down;
the learning switch installs flows with idle timeouts after one packet-in.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace as NS

import pytest

pytest.importorskip("os_ken", reason="os-ken is not installed (pip install os-ken)")

from os_ken.controller.handler import MAIN_DISPATCHER  # noqa: E402
from os_ken.lib.packet import arp, ethernet, ipv4, icmp, packet  # noqa: E402
from os_ken.ofproto import ofproto_v1_3 as ofp, ofproto_v1_3_parser as parser  # noqa: E402

from controllers import fabric as fabric_mod, l2_learning  # noqa: E402
from controllers.fabric import Fabric, tree_towards  # noqa: E402


class FakeDatapath:
    def __init__(self, dpid: int, ports: list[int]):
        self.id = dpid
        self.ofproto, self.ofproto_parser = ofp, parser
        self.ports = {p: parser.OFPPort(p, "00:00:00:00:00:00", f"p{p}", 0, 0, 0, 0, 0, 0, 0, 0) for p in ports}
        self.sent: list = []
        self.xid = 0

    def set_xid(self, msg) -> int:
        self.xid += 1
        msg.set_xid(self.xid)
        return self.xid

    def send_msg(self, msg) -> None:
        self.sent.append(msg)

    def take(self, kind) -> list:
        out = [m for m in self.sent if isinstance(m, kind)]
        self.sent = [m for m in self.sent if not isinstance(m, kind)]
        return out


# leaf-spine as topologies/ovs_fabric.yaml builds it: spines 1, 2; leaves 3, 4, 5; host port 13+
LINKS = [(3, 1, 1, 2), (3, 3, 2, 4), (4, 5, 1, 6), (4, 7, 2, 8), (5, 9, 1, 10), (5, 11, 2, 12)]
HOSTS = {"aa:00:00:00:00:01": (3, 13), "aa:00:00:00:00:02": (4, 14), "aa:00:00:00:00:03": (5, 15)}


def build(app) -> dict[int, FakeDatapath]:
    ports: dict[int, list[int]] = {d: [] for d in (1, 2, 3, 4, 5)}
    for a, pa, b, pb in LINKS:
        ports[a].append(pa)
        ports[b].append(pb)
    for d, p in HOSTS.values():
        ports[d].append(p)
    dps = {d: FakeDatapath(d, sorted(ps)) for d, ps in ports.items()}
    for dp in dps.values():
        app.state_change(NS(datapath=dp, state=MAIN_DISPATCHER))
    return dps


def discover(app) -> None:
    port = lambda d, p: NS(dpid=d, port_no=p)
    for a, pa, b, pb in LINKS:
        app.link_add(NS(link=NS(src=port(a, pa), dst=port(b, pb))))
        app.link_add(NS(link=NS(src=port(b, pb), dst=port(a, pa))))


def arp_request(src: str, src_ip: str, dst_ip: str) -> bytes:
    p = packet.Packet()
    p.add_protocol(ethernet.ethernet(dst="ff:ff:ff:ff:ff:ff", src=src, ethertype=0x0806))
    p.add_protocol(arp.arp(opcode=arp.ARP_REQUEST, src_mac=src, src_ip=src_ip,
                           dst_mac="00:00:00:00:00:00", dst_ip=dst_ip))
    p.serialize()
    return bytes(p.data)


def icmp_packet(src: str, dst: str) -> bytes:
    p = packet.Packet()
    p.add_protocol(ethernet.ethernet(dst=dst, src=src, ethertype=0x0800))
    p.add_protocol(ipv4.ipv4(src="192.168.10.11", dst="192.168.10.12", proto=1))
    p.add_protocol(icmp.icmp(type_=8, data=icmp.echo(id_=1, seq=1, data=b"x" * 8)))
    p.serialize()
    return bytes(p.data)


def packet_in(app, dp, port: int, data: bytes) -> None:
    app.packet_in(NS(msg=NS(datapath=dp, match={"in_port": port}, data=data)))


def simulate(app, dps, first: tuple[int, int, bytes], limit: int = 10_000) -> dict[str, int]:
    """Inject one packet-in and deliver every packet-out: to a host port (counted per host),
    or over a link as a packet-in at the other end (what a switch without a matching flow
    does). Returns how often each host got the packet and how many packet-ins it took."""
    peer = {}
    for a, pa, b, pb in LINKS:
        peer[(a, pa)], peer[(b, pb)] = (b, pb), (a, pa)
    host_at = {loc: mac for mac, loc in HOSTS.items()}
    got = {mac: 0 for mac in HOSTS}
    queue = deque([first])
    ins = 0
    while queue:
        ins += 1
        assert ins < limit, "packets keep circulating: a storm"
        d, port, data = queue.popleft()
        packet_in(app, dps[d], port, data)
        for dp in dps.values():
            for out in dp.take(parser.OFPPacketOut):
                for action in out.actions:
                    loc = (dp.id, action.port)
                    if loc in host_at:
                        got[host_at[loc]] += 1
                    elif loc in peer:
                        queue.append((*peer[loc], out.data))
    return {**got, "packet_ins": ins}


# ------------------------------------------------------------------------------- fabric
def test_tree_towards_picks_the_lowest_switch_on_equal_paths():
    adj = {3: [(1, 1, 2), (3, 2, 4)], 4: [(5, 1, 6), (7, 2, 8)], 1: [(2, 3, 1), (6, 4, 5)], 2: [(4, 3, 3), (8, 4, 7)]}
    towards_4 = tree_towards(adj, 4)
    assert towards_4[1] == 6 and towards_4[2] == 8     # spines: straight down to leaf 4
    assert towards_4[3] == 1                           # leaf 3: via spine 1 (lower id), not spine 2
    assert 4 not in towards_4


def test_broadcast_before_discovery_reaches_each_host_once_and_dies_out():
    app = Fabric()
    dps = build(app)      # links not discovered yet: every port looks like an edge port
    a = "aa:00:00:00:00:01"
    got = simulate(app, dps, (3, 13, arp_request(a, "192.168.10.11", "192.168.10.12")))
    assert got["aa:00:00:00:00:02"] == 1 and got["aa:00:00:00:00:03"] == 1
    assert got[a] == 0                                   # never back to the sender
    assert app.counters["duplicates_dropped"] > 0        # the copies that came over links
    assert app.hosts == {a: (3, 13)}                     # and none was taken for a host


def test_broadcast_after_discovery_never_crosses_a_link():
    app = Fabric()
    dps = build(app)
    discover(app)
    a = "aa:00:00:00:00:01"
    got = simulate(app, dps, (3, 13, arp_request(a, "192.168.10.11", "192.168.10.12")))
    assert got["packet_ins"] == 1                        # no copy came back through a link
    assert got["aa:00:00:00:00:02"] == 1 and got["aa:00:00:00:00:03"] == 1


def routes(dp: FakeDatapath) -> dict[str, int]:
    """What table 1 forwards where, from the flow-mods sent to the switch."""
    out: dict[str, int] = {}
    for m in dp.take(parser.OFPFlowMod):
        if m.table_id == fabric_mod.FORWARD_TABLE and "eth_dst" in m.match:
            if m.command == ofp.OFPFC_ADD:
                out[m.match["eth_dst"]] = m.instructions[0].actions[0].port
            else:
                out[m.match["eth_dst"]] = None
    return out


def test_unicast_follows_shortest_paths_and_moves_when_a_link_goes_down():
    app = Fabric()
    dps = build(app)
    discover(app)
    a, b = "aa:00:00:00:00:01", "aa:00:00:00:00:02"
    packet_in(app, dps[3], 13, arp_request(a, "192.168.10.11", "192.168.10.12"))
    packet_in(app, dps[4], 14, icmp_packet(b, a))
    assert app.hosts == {a: (3, 13), b: (4, 14)}
    leaf1 = routes(dps[3])
    assert leaf1[a] == 13 and leaf1[b] == 1              # to b: up to spine 1 (2 hops, lowest id)
    assert routes(dps[1])[b] == 6                        # spine 1: down to leaf 2
    # leaf1's uplink to spine 1 loses carrier: both ends report it
    down = NS(port_no=1, state=ofp.OFPPS_LINK_DOWN, config=0)
    app.port_status(NS(msg=NS(datapath=dps[3], reason=ofp.OFPPR_MODIFY, desc=down)))
    assert routes(dps[3])[b] == 3                        # now via spine 2
    assert app.routes[(2, a)] == 4                       # spine 2: down to leaf 1, as before
    assert app.counters["reroutes"] == 1
    # spine 1 can no longer reach leaf 1: its route to a goes via leaf 2 or 3 and spine 2
    assert app.routes[(1, a)] in (6, 10)


def test_host_learned_on_a_port_that_turns_out_to_be_a_link_is_forgotten():
    app = Fabric()
    dps = build(app)
    ghost = "aa:00:00:00:00:09"
    packet_in(app, dps[1], 2, icmp_packet(ghost, "aa:00:00:00:00:01"))   # before discovery
    assert ghost in app.hosts
    discover(app)
    assert ghost not in app.hosts
    assert all(mac != ghost for (_, mac) in app.routes)


# ------------------------------------------------------------------------------- l2_learning
def test_learning_switch_floods_unknown_then_installs_flows_with_idle_timeout():
    app = l2_learning.L2Learning()
    dp = FakeDatapath(7, [1, 2, 3])
    a, b = "aa:00:00:00:00:01", "aa:00:00:00:00:02"
    app.packet_in(NS(msg=NS(datapath=dp, match={"in_port": 1}, data=arp_request(a, "10.0.0.1", "10.0.0.2"))))
    (out,) = dp.take(parser.OFPPacketOut)
    assert [x.port for x in out.actions] == [ofp.OFPP_FLOOD]
    assert not dp.take(parser.OFPFlowMod)                # nothing known about b yet: no flow
    app.packet_in(NS(msg=NS(datapath=dp, match={"in_port": 2}, data=icmp_packet(b, a))))
    (flow,) = dp.take(parser.OFPFlowMod)
    assert dict(flow.match.items()) == {"in_port": 2, "eth_src": b, "eth_dst": a}
    assert flow.instructions[0].actions[0].port == 1
    assert flow.idle_timeout == l2_learning.IDLE_TIMEOUT and flow.cookie == l2_learning.COOKIE
    (out,) = dp.take(parser.OFPPacketOut)
    assert [x.port for x in out.actions] == [1]


# ------------------------------------------------------------------------------- service_lb
from controllers import service_lb  # noqa: E402

NODE_MAC = {"node1": "02:00:00:00:00:01", "node2": "02:00:00:00:00:02"}
LB_CONFIG = {
    "service_cidr": "10.96.0.0/12",
    "nodes": {"node1": {"ip": "192.168.1.129", "mac": NODE_MAC["node1"], "pod_cidr": "10.244.0.0/24"},
              "node2": {"ip": "192.168.1.130", "mac": NODE_MAC["node2"], "pod_cidr": "10.244.1.0/24"}},
    "services": [{"key": "default/web", "ip": "10.96.0.11", "protocol": "TCP", "port": 80, "affinity": "None",
                  "backends": [{"ip": "10.244.0.2", "port": 8080, "node": "node1", "pod": "web-0"},
                               {"ip": "10.244.1.2", "port": 8080, "node": "node2", "pod": "web-1"}]}],
}


def tcp_packet(src_mac: str, src: str, dst: str, sport: int, dport: int) -> bytes:
    from os_ken.lib.packet import tcp as tcp_mod
    p = packet.Packet()
    p.add_protocol(ethernet.ethernet(dst=service_lb.VIRTUAL_MAC, src=src_mac, ethertype=0x0800))
    p.add_protocol(ipv4.ipv4(src=src, dst=dst, proto=6))
    p.add_protocol(tcp_mod.tcp(src_port=sport, dst_port=dport, bits=tcp_mod.TCP_SYN))
    p.serialize()
    return bytes(p.data)


def lb_world():
    app = service_lb.ServiceLB()
    dp = FakeDatapath(1, [1, 2])
    app.mac_to_port[1] = {NODE_MAC["node1"]: 1, NODE_MAC["node2"]: 2}
    app.dps[1] = dp
    app.apply(LB_CONFIG)
    dp.sent.clear()
    return app, dp


def fields(actions) -> dict:
    out = {}
    for a in actions:
        if isinstance(a, parser.OFPActionSetField):
            out[a.key] = a.value
        elif isinstance(a, parser.OFPActionOutput):
            out["output"] = a.port
    return out


def test_service_lb_answers_arp_for_a_cluster_ip():
    app, dp = lb_world()
    app.packet_in(NS(msg=NS(datapath=dp, match={"in_port": 1},
                            data=arp_request(NODE_MAC["node1"], "192.168.1.129", "10.96.0.11"))))
    (out,) = dp.take(parser.OFPPacketOut)
    reply = packet.Packet(out.data).get_protocol(arp.arp)
    assert reply.opcode == arp.ARP_REPLY and reply.src_mac == service_lb.VIRTUAL_MAC and reply.src_ip == "10.96.0.11"
    assert [a.port for a in out.actions] == [1]


def test_service_lb_connection_to_another_node_keeps_the_client_ip():
    app, dp = lb_world()
    app.rr[("10.96.0.11", "TCP", 80)] = 1          # the next pick is web-1 on node2
    syn = tcp_packet(NODE_MAC["node1"], "10.244.0.9", "10.96.0.11", 40000, 80)
    app.packet_in(NS(msg=NS(datapath=dp, match={"in_port": 1}, data=syn)))
    fwd, rev = dp.take(parser.OFPFlowMod)
    assert fields(fwd.instructions[0].actions) == {"ipv4_dst": "10.244.1.2", "tcp_dst": 8080,
                                                   "eth_src": service_lb.VIRTUAL_MAC,
                                                   "eth_dst": NODE_MAC["node2"], "output": 2}
    assert dict(rev.match.items())["ipv4_dst"] == "10.244.0.9"          # the reply to the client itself
    assert fields(rev.instructions[0].actions) == {"ipv4_src": "10.96.0.11", "tcp_src": 80, "output": 1}
    assert fwd.idle_timeout == service_lb.IDLE_TIMEOUT and fwd.flags & ofp.OFPFF_SEND_FLOW_REM
    # the first packet waits for the barrier: the flows are in the switch before it moves on
    (barrier,) = dp.take(parser.OFPBarrierRequest)
    assert not dp.take(parser.OFPPacketOut)
    app.barrier_reply(NS(msg=NS(xid=barrier.xid)))
    (out,) = dp.take(parser.OFPPacketOut)
    assert fields(out.actions)["ipv4_dst"] == "10.244.1.2"


def test_service_lb_backend_on_the_clients_node_is_reached_through_snat():
    app, dp = lb_world()
    app.rr[("10.96.0.11", "TCP", 80)] = 0          # web-0, on node1 like the client
    syn = tcp_packet(NODE_MAC["node1"], "10.244.0.9", "10.96.0.11", 40001, 80)
    app.packet_in(NS(msg=NS(datapath=dp, match={"in_port": 1}, data=syn)))
    fwd, rev = dp.take(parser.OFPFlowMod)
    f = fields(fwd.instructions[0].actions)
    assert f["ipv4_src"] == service_lb.SNAT_IP and f["output"] == ofp.OFPP_IN_PORT
    r = dict(rev.match.items())
    assert r["ipv4_dst"] == service_lb.SNAT_IP and r["tcp_dst"] == f["tcp_src"]
    assert fields(rev.instructions[0].actions)["ipv4_dst"] == "10.244.0.9"
    # a second packet of the same connection (it overtook the flows) keeps its backend
    app.packet_in(NS(msg=NS(datapath=dp, match={"in_port": 1}, data=syn)))
    assert not dp.take(parser.OFPFlowMod)
    (out,) = dp.take(parser.OFPPacketOut)
    assert fields(out.actions)["ipv4_dst"] == "10.244.0.2"
    # the flow idles out: the connection is forgotten, its reverse flow deleted
    app.flow_removed(NS(msg=NS(cookie=service_lb.COOKIE, match=fwd.match)))
    assert app.conns == {} and app.by_reply == {}


def test_service_lb_forgets_connections_of_backends_that_left():
    app, dp = lb_world()
    for port in (40010, 40011):
        app.packet_in(NS(msg=NS(datapath=dp, match={"in_port": 1},
                                data=tcp_packet(NODE_MAC["node1"], "10.244.0.9", "10.96.0.11", port, 80))))
    assert len(app.conns) == 2
    dp.sent.clear()
    cfg = {**LB_CONFIG, "services": [{**LB_CONFIG["services"][0],
                                      "backends": LB_CONFIG["services"][0]["backends"][1:]}]}
    app.apply(cfg)
    assert [c["backend"]["pod"] for c in app.conns.values()] == ["web-1"]
    deleted = [m for m in dp.take(parser.OFPFlowMod) if m.command == ofp.OFPFC_DELETE_STRICT]
    assert len(deleted) == 2


def test_service_lb_without_endpoints_drops_and_counts():
    app, dp = lb_world()
    app.apply({**LB_CONFIG, "services": [{**LB_CONFIG["services"][0], "backends": []}]})
    dp.sent.clear()
    app.packet_in(NS(msg=NS(datapath=dp, match={"in_port": 1},
                            data=tcp_packet(NODE_MAC["node1"], "10.244.0.9", "10.96.0.11", 40020, 80))))
    assert dp.sent == [] and app.counters["no_endpoints"] == 1
