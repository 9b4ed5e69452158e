"""Emulation tests of the foundation: each mode wires pods that reach each other without
NAT, containers share a pod's localhost, the wire shows what each mode must show."""

from __future__ import annotations

import pytest

from helpers import THREE_NODES, capture, require_root_and, seen_source
from leftover_check import running
from k8snetlab import naming, spec
from k8snetlab.cluster import Cluster
from k8snetlab.cni import CNIError

pytestmark = pytest.mark.integration

MODES = ["host-gw", "ipip"]


@pytest.fixture(scope="module", params=MODES)
def cluster(request):
    require_root_and("mnexec", "brctl", "tc", "clang", "bpftool")
    with running(Cluster(spec.load(THREE_NODES, cni=request.param))) as c:
        yield c


def pods_on(c, node):
    return sorted((p for p in c.pods.values() if p.node_name == node), key=lambda p: p.name)


def test_every_pod_reaches_every_pod(cluster):
    pods = list(cluster.pods.values())
    src = pods_on(cluster, "node1")[0]
    for dst in pods:
        if dst is not src:
            r = src.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False)
            assert r.returncode == 0, f"{src.name} -> {dst.name} ({dst.ip}) in {cluster.spec.cni.type}: {r.stdout}"


def test_nodes_reach_pods(cluster):
    for node in cluster.nodes.values():
        for dst in cluster.pods.values():
            assert node.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False).returncode == 0, \
                f"{node.name} -> {dst.name}"


def test_server_sees_client_pod_ip(cluster, tmp_path):
    client = pods_on(cluster, "node1")[0]
    server = pods_on(cluster, "node2")[0]
    assert seen_source(server, client, server.ip, tmp_path) == client.ip


def test_pod_addresses_follow_mode(cluster):
    pod = pods_on(cluster, "node2")[0]
    node = cluster.nodes["node2"]
    assert pod.ip in [str(h) for h in node.spec.pod_cidr.hosts()]
    addrs = pod.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    mtu = pod.run(["cat", "/sys/class/net/eth0/mtu"]).stdout.strip()  # sysfs of the root ns: read via ip
    routes = pod.run(["ip", "route"]).stdout
    link = pod.run(["ip", "-o", "link", "show", "dev", "eth0"]).stdout
    if cluster.spec.cni.type == "ipip":
        assert f"{pod.ip}/32" in addrs
        assert "default via 169.254.1.1" in routes
        assert "mtu 1480" in link
        host = node.run(["ip", "route"]).stdout
        assert f"{pod.ip} dev cali" in host
    else:
        assert f"{pod.ip}/24" in addrs
        assert f"default via {next(node.spec.pod_cidr.hosts())}" in routes
        assert "mtu 1500" in link
        assert "cni0" in node.run(["ip", "-o", "link"]).stdout
    del mtu


def test_capture_shows_the_mode_on_the_wire(cluster, tmp_path):
    src, dst = pods_on(cluster, "node1")[0], pods_on(cluster, "node2")[0]
    n1, n2 = cluster.nodes["node1"], cluster.nodes["node2"]
    pkts = capture(n1, "eth0", tmp_path / "wire.pcap",
                   lambda: src.run(["ping", "-c", "3", "-i", "0.1", dst.ip]), bpf_filter="ip", count=6)
    from scapy.layers.inet import ICMP, IP
    ips = [p[IP] for p in pkts if IP in p]
    assert ips, "nothing captured"
    if cluster.spec.cni.type == "ipip":
        outer = [p for p in ips if p.proto == 4]
        assert outer, f"no IP protocol 4 on the wire: {[p.summary() for p in ips]}"
        for p in outer:
            assert {p.src, p.dst} == {n1.ip, n2.ip}
            inner = p.payload
            assert isinstance(inner, IP) and {inner.src, inner.dst} == {src.ip, dst.ip}
    else:
        assert all(p.proto != 4 for p in ips)
        icmp = [p for p in ips if ICMP in p]
        assert icmp and all({p.src, p.dst} == {src.ip, dst.ip} for p in icmp)


def test_two_containers_share_localhost(cluster):
    server = ("import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
              "s.bind(('127.0.0.1', 9099)); s.listen(1); c,_=s.accept(); "
              "open('/tmp/knltest-localhost-' + c.recv(64).decode(), 'w').close()")
    client = ("import socket, time\n"
              "for _ in range(100):\n"
              "    try:\n"
              "        socket.create_connection(('127.0.0.1', 9099), 1).sendall(b'ok'); break\n"
              "    except OSError: time.sleep(0.05)\n")
    import os
    import sys
    import time
    marker = "/tmp/knltest-localhost-ok"
    if os.path.exists(marker):
        os.unlink(marker)
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "two-containers"},
                "spec": {"nodeName": "node3", "containers": [
                    {"name": "server", "image": "python", "command": [sys.executable, "-c", server]},
                    {"name": "client", "image": "python", "command": [sys.executable, "-c", client]}]}}
    (pod,) = cluster.add_pod(manifest)
    try:
        assert set(pod.containers) == {"server", "client"}
        ino = {os.stat(f"/proc/{c.pid}/ns/net").st_ino for c in pod.containers.values()}
        assert ino == {os.stat(pod.netns).st_ino}, "containers are not in the pod's namespace"
        deadline = time.monotonic() + 10
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(marker), "the client container did not reach the server on localhost"
    finally:
        cluster.delete_pod("two-containers")
        if os.path.exists(marker):
            os.unlink(marker)


def test_add_and_delete_pod_releases_everything(cluster):
    node = cluster.nodes["node3"]
    before = set(node.run(["ip", "-o", "link"]).stdout.splitlines())
    (pod,) = cluster.add_pod({"kind": "Pod", "metadata": {"name": "extra"},
                              "spec": {"nodeName": "node3", "containers": [{"name": "c", "command": []}]}})
    ipam_dir = node.state_dir / "ipam" / cluster.mode.netconf(node).name
    assert (ipam_dir / pod.ip).exists()
    src = pods_on(cluster, "node1")[0]
    assert src.run(["ping", "-c", "1", "-W", "2", pod.ip], check=False).returncode == 0
    cluster.check_pod("extra")
    ip = pod.ip
    cluster.delete_pod("extra")
    assert "extra" not in cluster.pods
    assert not (ipam_dir / ip).exists()
    assert set(node.run(["ip", "-o", "link"]).stdout.splitlines()) == before


def test_check_detects_a_broken_pod(cluster):
    pod = pods_on(cluster, "node3")[0]
    cluster.check_pod(pod.name)
    pod.run(["ip", "addr", "flush", "dev", "eth0"])
    try:
        with pytest.raises(CNIError):
            cluster.check_pod(pod.name)
    finally:
        cluster.delete_pod(pod.name)


def test_bridge_ports_are_in_hairpin_mode(cluster):
    """flannel delegates to bridge with hairpinMode: a pod can reach itself through a Service."""
    if cluster.spec.cni.type != "host-gw":
        pytest.skip("the Calico layout has no bridge")
    out = cluster.nodes["node1"].run(["bridge", "-d", "link", "show"]).stdout
    ports = [l for l in out.splitlines() if "master cni0" in l]
    assert len(ports) == 2 and out.count("hairpin on") == 2, out


def test_gateway_mac_stays_when_a_pod_leaves(cluster):
    """cni0 keeps its MAC whatever its ports do, so pods' ARP entries for their gateway stay
    right. Unpinned, a Linux bridge takes its lowest port MAC: deleting that pod would change
    it and the other pods on the node would lose packets until their ARP entries expire."""
    if cluster.spec.cni.type != "host-gw":
        pytest.skip("the Calico layout has no bridge")
    node = cluster.nodes["node1"]

    def gw_mac() -> str:
        return node.run(["ip", "-br", "link", "show", "dev", naming.BRIDGE]).stdout.split()[2]

    before = gw_mac()
    src, dst = pods_on(cluster, "node1")[0], pods_on(cluster, "node2")[0]
    (low,) = cluster.add_pod({"kind": "Pod", "metadata": {"name": "low-mac"},
                              "spec": {"nodeName": "node1", "containers": [{"name": "c", "command": []}]}})
    try:   # lower than any random locally administered MAC another port can have
        veth = naming.host_veth("veth", low.container_id, naming.POD_IFNAME)
        node.run(["ip", "link", "set", "dev", veth, "address", "02:00:00:00:00:01"])
        src.run(["ip", "neigh", "flush", "dev", naming.POD_IFNAME])
        assert src.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False).returncode == 0   # ARP for the gateway
        assert gw_mac() == before, "cni0 took the MAC of a port"
    finally:
        cluster.delete_pod("low-mac")
    assert gw_mac() == before, "cni0 changed its MAC when a pod left"
    r = src.run(["ping", "-c", "1", "-W", "1", dst.ip], check=False)
    assert r.returncode == 0, f"{src.name} lost its gateway after a pod on its node left: {r.stdout}"
