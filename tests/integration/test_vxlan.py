"""flannel VXLAN on a flat and on a routed underlay: pods reach each other without NAT, the
wire shows UDP 8472 with VNI 1 around the pods' own packets, every node's ``flannel.1`` holds
one neighbour and one FDB entry per other node (no learning), and they follow nodes joining
and leaving. One cluster per underlay, shared by the module; nothing is left after it."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, THREE_NODES, capture, require_root_and, seen_source
from leftover_check import running

from k8snetlab import spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration

TWO_RACKS = REPO / "topologies" / "two_racks.yaml"
# per underlay: the node sending, a node of another subnet (or the other node), a node to add
LAYOUT = {
    "three_nodes": (THREE_NODES, "node1", "node3", ("node4", "192.168.1.132")),
    "two_racks": (TWO_RACKS, "node-a1", "node-b1", ("node-b3", "10.100.1.13")),
}


@pytest.fixture(scope="module", params=list(LAYOUT))
def lab(request):
    require_root_and("mnexec", "brctl", "tcpdump")
    path, src, far, new = LAYOUT[request.param]
    with running(Cluster(spec.load(path, cni="vxlan"))) as c:
        yield c, src, far, new


def pods_on(c, node):
    return sorted((p for p in c.pods.values() if p.node_name == node), key=lambda p: p.name)


def vtep(node) -> dict:
    (info,) = json.loads(node.run(["ip", "-d", "-j", "link", "show", "dev", "flannel.1"]).stdout)
    return info


def test_every_pod_reaches_every_pod(lab):
    c, src_node, _, _ = lab
    src = pods_on(c, src_node)[0]
    for dst in c.pods.values():
        if dst is not src:
            r = src.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False)
            assert r.returncode == 0, f"{src.name} -> {dst.name} on {dst.node_name} ({dst.ip}): {r.stdout}"


def test_nodes_reach_remote_pods(lab):
    c, src_node, far, _ = lab
    dst = pods_on(c, far)[0]
    assert c.nodes[src_node].run(["ping", "-c", "1", "-W", "2", dst.ip], check=False).returncode == 0


def test_server_sees_the_client_pod_ip(lab, tmp_path):
    c, src_node, far, _ = lab
    client, server = pods_on(c, src_node)[0], pods_on(c, far)[0]
    assert seen_source(server, client, server.ip, tmp_path) == client.ip


def test_pods_get_mtu_1450(lab):
    c, src_node, _, _ = lab
    link = pods_on(c, src_node)[0].run(["ip", "-o", "link", "show", "dev", "eth0"]).stdout
    assert "mtu 1450" in link


def test_vtep_is_flannels(lab):
    c, src_node, _, _ = lab
    node = c.nodes[src_node]
    info = vtep(node)
    data = info["linkinfo"]["info_data"]
    assert info["linkinfo"]["info_kind"] == "vxlan" and info["mtu"] == 1450
    assert data["id"] == 1 and data["port"] == 8472 and data["local"] == node.ip
    assert data.get("learning") is False and data["link"] == "eth0"
    addrs = node.run(["ip", "-4", "-o", "addr", "show", "dev", "flannel.1"]).stdout
    assert f"{node.spec.pod_cidr.network_address}/32" in addrs


def test_one_neighbour_fdb_entry_and_route_per_peer(lab):
    c, src_node, _, _ = lab
    node = c.nodes[src_node]
    neigh = json.loads(node.run(["ip", "-j", "neigh", "show", "dev", "flannel.1"]).stdout)
    fdb = json.loads(node.run(["bridge", "-j", "fdb", "show", "dev", "flannel.1"]).stdout)
    routes = node.run(["ip", "route"]).stdout
    peers = [n for n in c.nodes.values() if n is not node]
    assert len(neigh) == len(peers) and len(fdb) == len(peers)
    for peer in peers:
        vtep_ip, mac = str(peer.spec.pod_cidr.network_address), vtep(peer)["address"]
        assert {"dst": vtep_ip, "lladdr": mac} in [{"dst": n["dst"], "lladdr": n["lladdr"]} for n in neigh]
        assert all("PERMANENT" in n["state"] for n in neigh)
        assert {"mac": mac, "dst": peer.ip} in [{"mac": f["mac"], "dst": f.get("dst")} for f in fdb]
        assert f"{peer.spec.pod_cidr} via {vtep_ip} dev flannel.1" in routes and "onlink" in routes


def test_capture_shows_udp_8472_vni_1_around_the_pods_packets(lab, tmp_path):
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.vxlan import VXLAN
    c, src_node, far, _ = lab
    src, dst = pods_on(c, src_node)[0], pods_on(c, far)[0]
    pkts = capture(c.nodes[src_node], "eth0", tmp_path / "vxlan.pcap",
                   lambda: src.run(["ping", "-c", "3", "-i", "0.1", dst.ip]), bpf_filter="udp", count=6)
    wrapped = [p for p in pkts if VXLAN in p]
    assert len(wrapped) == 6, [p.summary() for p in pkts]
    for p in wrapped:
        outer, inner = p[IP], p[VXLAN][IP]
        assert p[UDP].dport == 8472 and p[VXLAN].vni == 1
        # the outer header names the nodes themselves, also when a router is in between
        assert {outer.src, outer.dst} == {c.nodes[src_node].ip, c.nodes[far].ip}
        assert {inner.src, inner.dst} == {src.ip, dst.ip} and ICMP in inner
        assert outer.len - inner.len == 50


def test_entries_follow_nodes_joining_and_leaving(lab):
    c, src_node, _, (name, ip) = lab
    node = c.nodes[src_node]
    new = c.add_node(name, ip)
    try:
        (pod,) = c.add_pod({"kind": "Pod", "metadata": {"name": "joiner"},
                            "spec": {"nodeName": name, "containers": [{"name": "c", "command": []}]}})
        mac, vtep_ip = vtep(new)["address"], str(new.spec.pod_cidr.network_address)
        assert vtep_ip in node.run(["ip", "neigh", "show", "dev", "flannel.1"]).stdout
        assert f"{mac} dst {ip}" in node.run(["bridge", "fdb", "show", "dev", "flannel.1"]).stdout
        src = pods_on(c, src_node)[0]
        assert src.run(["ping", "-c", "1", "-W", "2", pod.ip], check=False).returncode == 0
    finally:
        c.remove_node(name)
    assert vtep_ip not in node.run(["ip", "neigh", "show", "dev", "flannel.1"]).stdout
    assert mac not in node.run(["bridge", "fdb", "show", "dev", "flannel.1"]).stdout
    assert str(new.spec.pod_cidr) not in node.run(["ip", "route"]).stdout
