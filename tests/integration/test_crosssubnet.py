"""Calico ``ipipMode: CrossSubnet`` on two racks: plain packets between nodes of one rack,
IP protocol 4 between racks (and the ToR routers only ever forward node-to-node packets),
map entries only for the other rack's nodes. And ``datapath: kernel`` on a kernel without
ipip: refused at start with one line naming the file and key, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, capture, kernel_has_ipip, require_root_and, seen_source
from leftover_check import Footprint, running

from k8snetlab import ebpf, spec
from k8snetlab.cluster import Cluster
from k8snetlab.errors import KernelFeatureMissing

pytestmark = pytest.mark.integration

TWO_RACKS = REPO / "topologies" / "two_racks.yaml"


@pytest.fixture(scope="module")
def cluster():
    require_root_and("mnexec", "brctl", "tcpdump", "tc")
    s = spec.load(TWO_RACKS, cni="ipip")
    assert s.cni.options.ipip_mode == "CrossSubnet"
    if s.cni.options.datapath in ("auto", "ebpf") and ebpf.have_tools():
        pytest.skip(ebpf.have_tools())
    with running(Cluster(s)) as c:
        yield c


def pod_on(c, node):
    return next(p for p in sorted(c.pods.values(), key=lambda p: p.name) if p.node_name == node)


def test_every_pod_reaches_every_pod(cluster):
    pods = list(cluster.pods.values())
    for src in pods:
        for dst in pods:
            if src is not dst:
                assert src.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False).returncode == 0, \
                    f"{src.name} ({src.node_name}) -> {dst.name} ({dst.node_name})"


def test_server_across_racks_sees_the_client_pod_ip(cluster, tmp_path):
    client, server = pod_on(cluster, "node-a1"), pod_on(cluster, "node-b2")
    assert seen_source(server, client, server.ip, tmp_path) == client.ip


def wire(cluster, host, ifname, src, dst, tmp_path, name):
    from scapy.layers.inet import IP
    pkts = capture(host, ifname, tmp_path / f"{name}.pcap",
                   lambda: src.run(["ping", "-c", "3", "-i", "0.1", dst.ip]),
                   bpf_filter="icmp or ip proto 4", count=6)
    return [p[IP] for p in pkts if IP in p]


def test_plain_inside_a_rack(cluster, tmp_path):
    src, dst = pod_on(cluster, "node-a1"), pod_on(cluster, "node-a2")
    ips = wire(cluster, cluster.nodes["node-a1"], "eth0", src, dst, tmp_path, "rack")
    assert len(ips) == 6, [p.summary() for p in ips]
    assert all(p.proto == 1 and {p.src, p.dst} == {src.ip, dst.ip} for p in ips), [p.summary() for p in ips]


def test_protocol_4_across_racks(cluster, tmp_path):
    from scapy.layers.inet import ICMP, IP
    src, dst = pod_on(cluster, "node-a1"), pod_on(cluster, "node-b1")
    a1, b1 = cluster.nodes["node-a1"], cluster.nodes["node-b1"]
    ips = wire(cluster, a1, "eth0", src, dst, tmp_path, "across")
    assert len(ips) == 6 and all(p.proto == 4 for p in ips), [p.summary() for p in ips]
    for p in ips:
        assert {p.src, p.dst} == {a1.ip, b1.ip}
        inner = p.payload
        assert isinstance(inner, IP) and {inner.src, inner.dst} == {src.ip, dst.ip} and ICMP in inner
        assert p.len - inner.len == 20


def test_the_routers_forward_node_to_node_packets_only(cluster, tmp_path):
    """On the link between the ToRs every packet is addressed node to node: the routers know
    no pod route, and need none."""
    src, dst = pod_on(cluster, "node-a2"), pod_on(cluster, "node-b2")
    core = next(f"eth{k}" for k, (subnet, _) in enumerate(cluster.spec.underlay.routers[0].interfaces)
                if subnet == "core")
    ips = wire(cluster, cluster.routers["tor-a"], core, src, dst, tmp_path, "core")
    assert len(ips) == 6 and all(p.proto == 4 for p in ips), [p.summary() for p in ips]
    assert {(p.src, p.dst) for p in ips} == {(cluster.nodes["node-a2"].ip, cluster.nodes["node-b2"].ip),
                                             (cluster.nodes["node-b2"].ip, cluster.nodes["node-a2"].ip)}
    assert "10.244." not in cluster.routers["tor-a"].run(["ip", "route"]).stdout


def test_routes_and_tunnel_entries_only_across(cluster):
    a1 = cluster.nodes["node-a1"]
    cidr = {n: str(cluster.nodes[n].spec.pod_cidr) for n in cluster.nodes}
    routes = a1.run(["ip", "route"]).stdout
    assert f"{cidr['node-a2']} via 10.100.0.12 dev eth0" in routes
    if cluster.mode.datapath == "ebpf":
        for n in ("node-b1", "node-b2"):     # next hop the ToR; the outer header names the node
            assert f"{cidr[n]} via 10.100.0.1 dev eth0" in routes
        tc = cluster.mode.bpf_datapath("node-a1")
        assert tc.tunnels() == {cidr["node-b1"]: "10.100.1.11", cidr["node-b2"]: "10.100.1.12"}
        assert tc.peers() == {"10.100.1.11", "10.100.1.12"}
        assert tc.stats()["encap"] > 0          # the captures above went through it
    else:
        for n in ("node-b1", "node-b2"):
            assert f"{cidr[n]} via {cluster.nodes[n].ip} dev tunl0" in routes


def test_pods_keep_mtu_1480(cluster):
    assert "mtu 1480" in pod_on(cluster, "node-a1").run(["ip", "-o", "link", "show", "dev", "eth0"]).stdout


# ---------------------------------------------------------------------------- datapath: kernel

def kernel_file(tmp_path):
    data = yaml.safe_load(TWO_RACKS.read_text())
    data["cni"] = {"type": "ipip", "ipip": {"datapath": "kernel", "ipipMode": "CrossSubnet"}}
    path = tmp_path / "two_racks_kernel.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_kernel_datapath_without_ipip_is_refused_and_leaves_nothing(tmp_path):
    require_root_and("mnexec", "brctl")
    path = kernel_file(tmp_path)
    c = Cluster(spec.load(path))
    try:
        c.start()
    except KernelFeatureMissing as e:
        line = str(e)
        assert "\n" not in line and str(path) in line and "cni.ipip.datapath" in line and "ebpf" in line
        assert c.state is not None and not c.state.path.exists()
        assert not [n for n in os.listdir("/sys/class/net") if n.startswith(f"{c.state.prefix}s")]
        return
    try:   # this kernel has ipip: then the kernel datapath must work as Calico's does
        footprint = Footprint(c)
        a1 = c.nodes["node-a1"]
        assert "dev tunl0" in a1.run(["ip", "route"]).stdout
        assert pod_on(c, "node-a1").run(["ping", "-c", "1", "-W", "2", pod_on(c, "node-b1").ip],
                                        check=False).returncode == 0
    finally:
        c.stop()
    footprint.assert_gone()


def test_cli_refuses_the_kernel_datapath_in_one_line(tmp_path):
    require_root_and("mnexec", "brctl", "unshare")
    if kernel_has_ipip():
        pytest.skip("this kernel has ipip: the kernel datapath runs (test_kernel_datapath_... checks it)")
    path = kernel_file(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "k8snetlab.cli", "up", str(path)], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:          # a hang is a failure: tear the cluster down first
        p.terminate()                          # SIGTERM tears the cluster down like Ctrl-C
        out, err = p.communicate(timeout=60)
        pytest.fail(f"'k8snetlab up' with datapath kernel on a kernel without ipip still runs after 60 s "
                    f"instead of refusing: {err[-500:]}")
    assert p.returncode == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("k8snetlab: error: "), err
    assert str(path) in lines[0] and "cni.ipip.datapath" in lines[0] and "ebpf" in lines[0]
    assert out == ""
