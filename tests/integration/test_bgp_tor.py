"""``bgp`` with ``peerWithToR`` on two racks: each node peers by eBGP with its top-of-rack router
(BIRD, an AS per rack), the routers peer with each other over the core subnet, and pods in
different racks reach each other with no encapsulation at all: a capture on the core link
shows the pods' own addresses, no IP-in-IP (protocol 4), no VXLAN (UDP 8472)."""

from __future__ import annotations

import pytest
from helpers import REPO, capture, require_root_and
from bgp_helpers import assert_gone, require_bgp, started

from k8snetlab import spec
from k8snetlab.bgp import plan

pytestmark = pytest.mark.integration

TWO_RACKS = REPO / "topologies" / "two_racks.yaml"


@pytest.fixture(scope="module")
def racks():
    require_bgp()
    s = spec.with_cni(spec.load(TWO_RACKS), "bgp", bgp={"peerWithToR": True, "holdTime": 9,
                                                   "speakers": {"node-b2": "exabgp"}}, invoke="inprocess")
    c, record = started(s)
    yield c
    c.stop()
    assert_gone(record)


def pod_on(c, node: str):
    return next(p for p in sorted(c.pods.values(), key=lambda p: p.name) if p.node_name == node)


def test_every_pod_reaches_every_pod_across_racks(racks):
    pods = sorted(racks.pods.values(), key=lambda p: p.name)
    for src in pods:
        for dst in pods:
            if src is not dst:
                r = src.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False)
                assert r.returncode == 0, f"{src.name} ({src.node_name}) -> {dst.name} ({dst.node_name}): {r.stdout}"


def test_nodes_peer_with_their_tor_and_tors_with_each_other(racks):
    st = racks.mode.status()
    assert {x.peer for x in st["tor-a"].sessions} == {"node-a1", "node-a2", "tor-b"}
    assert {x.peer for x in st["tor-b"].sessions} == {"node-b1", "node-b2", "tor-a"}
    for name in ("node-a1", "node-a2", "node-b1", "node-b2"):
        (sess,) = st[name].sessions
        assert sess.peer == ("tor-a" if name.startswith("node-a") else "tor-b")
    assert all(x.established for s in st.values() for x in s.sessions)
    routers = {r.name: r.asn for r in racks.mode.plan().routers()}
    assert routers == {"tor-a": plan.FIRST_TOR_AS, "tor-b": plan.FIRST_TOR_AS + 1}
    a1 = racks.nodes["node-a1"].run(["ip", "-o", "route"]).stdout
    b = racks.nodes["node-b1"].spec.pod_cidr
    a2 = racks.nodes["node-a2"]
    assert f"{b} via 10.100.0.1 dev eth0 proto bird" in a1                       # the other rack: via the ToR
    assert f"{a2.spec.pod_cidr} via {a2.spec.ip} dev eth0 proto bird" in a1      # same rack: straight to the node
    tor = racks.routers["tor-a"].run(["ip", "-o", "route"]).stdout
    assert f"{b} via 10.100.255.2 dev eth1 proto bird" in tor


def test_capture_on_the_core_shows_plain_pod_addresses(racks, tmp_path):
    require_root_and("tcpdump")
    src, dst = pod_on(racks, "node-a1"), pod_on(racks, "node-b2")
    pkts = capture(racks.routers["tor-a"], "eth1", tmp_path / "core.pcap",
                   lambda: src.run(["ping", "-c", "3", "-i", "0.2", dst.ip]), bpf_filter="ip and not tcp port 179",
                   count=6)
    from scapy.layers.inet import ICMP, IP, UDP
    ips = [p[IP] for p in pkts if IP in p]
    assert len(ips) >= 6, [p.summary() for p in pkts]
    assert not [p for p in ips if p.proto == 4], "IP-in-IP on the core"
    assert not [p for p in pkts if UDP in p and 8472 in (p[UDP].dport, p[UDP].sport)], "VXLAN on the core"
    pairs = {(p.src, p.dst) for p in ips if ICMP in p}
    assert (src.ip, dst.ip) in pairs and (dst.ip, src.ip) in pairs, pairs
