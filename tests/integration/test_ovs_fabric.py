"""A looped leaf-spine underlay of Open vSwitch switches under the ``fabric`` controller app
(topologies/ovs_fabric.yaml): every node and pod reaches every other, a broadcast does not
circle the loops, and when the link carrying a ping goes down mid-ping the traffic moves to
the other spine with bounded loss (reported), and comes back when the link does."""

from __future__ import annotations

import subprocess
import time

import pytest

from helpers import REPO
from ovs_helpers import require_ovs
from k8snetlab import measure, proc, spec
from k8snetlab.cluster import Cluster
from k8snetlab.underlay_ovs import switch_links

pytestmark = pytest.mark.integration

FABRIC = REPO / "topologies" / "ovs_fabric.yaml"
LINKS = 6


@pytest.fixture(scope="module")
def cluster():
    require_ovs()
    c = Cluster(spec.load(FABRIC))
    c.start()
    yield c
    c.stop()


def link_ports(c) -> list[str]:
    return [port for leaf in ("leaf1", "leaf2", "leaf3") for spine in ("spine1", "spine2")
            for pair in switch_links(c, leaf, spine) for port in pair]


def tx_total(c, ports) -> int:
    return sum(c.ovs.tx_packets(p) for p in ports)


def test_fabric_discovered_every_switch_and_link(cluster):
    view = cluster.ovs.controller_state()
    assert len(view["switches"]) == 5
    assert len(view["links"]) == LINKS


def test_pingall_across_the_looped_underlay(cluster):
    hosts = [*cluster.nodes.values(), *cluster.pods.values()]
    failed = []
    for src in hosts:
        for dst in hosts:
            if src is not dst and src.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False).returncode:
                failed.append(f"{src.name}->{dst.name}")
    assert failed == []


def test_broadcast_does_not_circle_the_loops(cluster):
    """Forget every neighbour (ARP is broadcast again) and resolve them all: the switch-to-switch
    links carry a handful of frames, where a flooding switch would carry them forever."""
    ports = link_ports(cluster)
    before = tx_total(cluster, ports)
    for n in cluster.nodes.values():
        n.run(["ip", "neigh", "flush", "all"])
    for src in cluster.nodes.values():
        for dst in cluster.nodes.values():
            if src is not dst:
                src.run(["ping", "-c", "1", "-W", "2", dst.ip])
    time.sleep(0.5)
    crossed = tx_total(cluster, ports) - before
    assert crossed < 100, f"{crossed} frames crossed the fabric's links for 6 ARP + 12 ICMP exchanges"
    view = cluster.ovs.controller_state()
    assert view["floods"] < 200


def test_link_failure_mid_ping_is_rerouted(cluster, record_property):
    n1, n2 = cluster.nodes["node1"], cluster.nodes["node2"]
    uplinks = [switch_links(cluster, "leaf1", s)[0][0] for s in ("spine1", "spine2")]
    before = {u: cluster.ovs.tx_packets(u) for u in uplinks}
    n1.run(["ping", "-c", "20", "-i", "0.01", "-q", n2.ip])
    busy = max(uplinks, key=lambda u: cluster.ovs.tx_packets(u) - before[u])
    count, interval = 300, 0.01
    ping = subprocess.Popen(["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", n2.ip],
                            stdout=subprocess.PIPE, text=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
                            preexec_fn=lambda: proc.setns(n1.netns))
    try:
        time.sleep(1.0)                              # a third of the pings are through
        cluster.ovs.set_link(busy, up=False)         # the uplink carrying them fails
        out, _ = ping.communicate(timeout=count * interval + 20)
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait()
    stats = measure.parse_ping(out)
    lost = stats.sent - stats.received
    record_property("reroute_lost_pings", lost)
    record_property("reroute_ms", cluster.ovs.controller_state().get("last_reroute_ms"))
    print(f"\nlink {busy} down mid-ping: {lost} of {stats.sent} pings lost at {interval * 1000:.0f} ms intervals "
          f"(controller recomputed routes in {cluster.ovs.controller_state().get('last_reroute_ms', 0):.1f} ms)")
    assert stats.sent == count
    assert lost <= count // 3, f"{lost} of {count} lost: traffic did not move to the other spine"
    last = [int(l.split("icmp_seq=")[1].split()[0]) for l in out.splitlines() if "icmp_seq=" in l]
    assert set(range(count - 50, count + 1)) & set(last) == set(range(count - 50, count + 1)), \
        "the last pings did not get through after the failure"
    view = cluster.ovs.controller_state()
    assert len(view["links"]) == LINKS - 1 and view["reroutes"] >= 1
    # the link comes back: rediscovered by LLDP, the fabric whole again
    cluster.ovs.set_link(busy, up=True)
    deadline = time.monotonic() + 15
    while len(cluster.ovs.controller_state()["links"]) < LINKS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(cluster.ovs.controller_state()["links"]) == LINKS
    for dst in cluster.pods.values():
        assert n1.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False).returncode == 0


def test_fabric_flows_show_both_tables(cluster):
    leaf1 = cluster.switches["leaf1"].name
    flows = cluster.ovs.flows(leaf1)
    assert any("cookie=0xfab" in f and "table=1" in f and "dl_dst=" in f for f in flows)
    assert any("cookie=0xfab" in f and "goto_table:1" in f for f in flows)
    assert any("dl_type=0x88cc" in f and "CONTROLLER" in f for f in flows)    # LLDP to the controller


def test_a_tree_of_linux_bridges_connects_its_hosts():
    """The switch level without OVS: two Linux bridges linked, a node on each."""
    require_ovs()
    d = {"name": "lb-tree",
         "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.30.0/24"}],
                      "switches": [{"name": "a", "attach": ["node1"]}, {"name": "b", "attach": ["node2"]}],
                      "links": [["a", "b"]]},
         "nodes": [{"name": "node1", "ip": "192.168.30.11"}, {"name": "node2", "ip": "192.168.30.12"}],
         "cni": {"type": "host-gw"}}
    with Cluster(spec.from_dict(d, "lb-tree.yaml")) as c:
        assert c.nodes["node1"].run(["ping", "-c", "1", "-W", "2", "192.168.30.12"], check=False).returncode == 0
        a, b = c.switches["a"], c.switches["b"]
        assert a.connectionsTo(b) and a.connectionsTo(c.nodes["node1"]) and b.connectionsTo(c.nodes["node2"])
