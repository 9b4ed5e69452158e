"""kube-proxy userspace mode, as the classic walk-throughs trace it: iptables REDIRECTs Service
traffic to a proxy process on the node, which opens a second connection to a backend pod.
A capture shows both connections; the backend sees the node, never the client pod."""

from __future__ import annotations

import sys
import time

import pytest

from helpers import require_root_and
from services_helpers import WHO, ask, stop_and_check
from k8snetlab import proc, spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration

def cluster_file(cni: str) -> dict:
    return {
        "name": f"userspace-{cni}",
        "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
        "nodes": [{"name": f"node{i}", "ip": f"192.168.1.{128 + i}"} for i in (1, 2, 3)],
        "cni": {"type": cni},
        "kubeProxy": {"mode": "userspace", "dns": False},
        "workloads": [
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
             "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                      "template": {"metadata": {"labels": {"app": "web"}},
                                   "spec": {"containers": [{"name": "web", "command": [sys.executable, "-c", WHO],
                                                            "ports": [{"name": "http", "containerPort": 8080}]}]}}}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
             "spec": {"nodeName": "node1", "containers": [{"name": "c", "command": ["sleep", "infinity"]}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
             "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
        ],
    }


def start(cni: str) -> Cluster:
    require_root_and("mnexec", "brctl", "iptables-restore", "tcpdump")
    c = Cluster(spec.from_dict(cluster_file(cni), f"test_userspace ({cni})"))
    c.start()
    return c


@pytest.fixture(scope="module")
def cluster():
    c = start("host-gw")
    yield c
    stop_and_check(c)


def cluster_ip(c: Cluster) -> str:
    return c.services.service("default/web").cluster_ip


def test_capture_shows_two_connections(cluster, tmp_path):
    """Inside the client pod: client pod IP -> Service IP. On node1's eth0: node1's IP ->
    a backend pod IP on another node. The backend never sees the client pod's address."""
    from scapy.all import IP, TCP, rdpcap
    client, node1 = cluster.pods["client"], cluster.nodes["node1"]
    vip = cluster_ip(cluster)
    remote = {p.ip for p in cluster.pods.values() if p.name.startswith("web-") and p.node_name != "node1"}
    syn_only = "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn"
    pod_pcap, wire_pcap = tmp_path / "pod.pcap", tmp_path / "wire.pcap"
    dumps = [client.popen_ns(["tcpdump", "-i", "eth0", "-n", "-U", "-c", "3", "-w", str(pod_pcap), syn_only]),
             node1.popen_ns(["tcpdump", "-i", "eth0", "-n", "-U", "-c", "2", "-w", str(wire_pcap),
                             f"{syn_only} and tcp port 8080"])]
    try:
        time.sleep(0.5)          # tcpdump has no readiness signal
        answers = ask(client, vip, 80, 3)   # round robin: each of the three backends once
        for d in dumps:
            d.wait(10)
    finally:
        for d in dumps:
            if d.poll() is None:
                d.terminate()
                d.wait(5)
    assert not [a for a in answers if a.startswith("ERR")], answers
    pod_side = [(p[IP].src, p[IP].dst, p[TCP].dport) for p in rdpcap(str(pod_pcap)) if IP in p]
    assert pod_side == [(client.ip, vip, 80)] * 3
    wire = [(p[IP].src, p[IP].dst, p[TCP].dport) for p in rdpcap(str(wire_pcap)) if IP in p]
    assert sorted(wire) == sorted((node1.ip, ip, 8080) for ip in remote)
    # the backends saw node1 (its address, or its bridge address for the local backend)
    seen = {a.split()[1] for a in answers}
    gateway = str(next(node1.spec.pod_cidr.hosts()))
    assert seen <= {node1.ip, gateway} and client.ip not in seen


def test_successive_requests_go_round_robin(cluster):
    backends = {p.ip for p in cluster.pods.values() if p.name.startswith("web-")}
    answers = ask(cluster.pods["client"], cluster_ip(cluster), 80, 9)
    served = [a.split()[0] for a in answers]
    assert set(served) == backends
    assert all(served.count(ip) == 3 for ip in backends), served
    assert len(set(served[:3])) == 3 and served[3:6] == served[:3]   # the same rotation, again


def test_node_rules_point_at_the_proxy(cluster):
    """iptables-save on a node shows kube-proxy's userspace chains, and the port they send to
    is one the node's proxy process listens on."""
    node = cluster.nodes["node2"]
    proxier = cluster.services.proxiers["node2"]
    vip = cluster_ip(cluster)
    saved = node.run(["iptables-save", "-t", "nat"]).stdout
    portal = [line for line in saved.splitlines() if line.startswith("-A KUBE-PORTALS-CONTAINER") and vip in line]
    host = [line for line in saved.splitlines() if line.startswith("-A KUBE-PORTALS-HOST") and vip in line]
    assert len(portal) == 1 and "-j REDIRECT --to-ports" in portal[0]
    port = int(portal[0].split()[-1])
    assert len(host) == 1 and host[0].endswith(f"-j DNAT --to-destination {node.ip}:{port}")
    assert "-A PREROUTING" in saved and "-j KUBE-PORTALS-CONTAINER" in saved
    assert proc.listening(proxier.process.pid, port)
    # and from the node itself (KUBE-PORTALS-HOST) the Service answers too
    assert not [a for a in ask(node, vip, 80, 2) if a.startswith("ERR")]


def test_rules_deleted_by_hand_come_back(cluster):
    node = cluster.nodes["node3"]
    node.run(["iptables", "-t", "nat", "-F", "KUBE-PORTALS-CONTAINER"])
    node.run(["iptables", "-t", "nat", "-D", "PREROUTING", "1"])
    cluster.services.resync()
    saved = node.run(["iptables-save", "-t", "nat"]).stdout
    assert "-j KUBE-PORTALS-CONTAINER" in saved and f"-d {cluster_ip(cluster)}/32" in saved


def test_no_endpoints_refused_at_once(cluster):
    cluster.services.add_service({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "nobody"},
                                  "spec": {"selector": {"app": "nobody"}, "ports": [{"port": 80}]}})
    try:
        ip = cluster.services.service("default/nobody").cluster_ip
        t0 = time.monotonic()
        answers = ask(cluster.pods["client"], ip, 80, 1)
        assert answers[0].startswith("ERR") and "refused" in answers[0], answers
        assert time.monotonic() - t0 < 3     # refused, not timed out (the connect timeout is 3 s)
    finally:
        cluster.services.delete_service("default/nobody")


def test_calico_layout_dnats_to_the_node():
    """Calico's cali* veths have no address to REDIRECT to: the container portals DNAT to the
    node's address instead, and Services work the same."""
    c = start("ipip")
    try:
        vip, node1 = cluster_ip(c), c.nodes["node1"]
        saved = node1.run(["iptables-save", "-t", "nat"]).stdout
        portal = [line for line in saved.splitlines() if line.startswith("-A KUBE-PORTALS-CONTAINER") and vip in line]
        assert len(portal) == 1 and f"-j DNAT --to-destination {node1.ip}:" in portal[0]
        answers = ask(c.pods["client"], vip, 80, 3)
        backends = {p.ip for p in c.pods.values() if p.name.startswith("web-")}
        assert {a.split()[0] for a in answers} == backends
    finally:
        stop_and_check(c)
