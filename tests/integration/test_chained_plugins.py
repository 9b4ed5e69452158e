"""The chained plugins on a live cluster, ours and Debian's reference binaries alike.

One cluster per variant (module scope): flannel host-gw with our plugins, and the bridge mode
with ``reference: true`` (containernetworking-plugins' bridge, host-local, tuning, bandwidth,
portmap). Each has two nodes and an external host ``client`` on the underlay; the chain is
[tuning, bandwidth, portmap].

- hostPort: reachable from the external host (TCP and UDP) and from another node; a pod that
  reaches its own hostPort through its node sees the node's address as the source (hairpin
  masquerade); CHECK notices a deleted rule; DEL leaves no rule or chain of the pod.
``K8SNETLAB_CHAIN_ALL=1`` adds the Calico layout (``ipip``), with our chained plugins and with
the reference ones (``cni.chain.reference``).

- bandwidth: a pod annotated 100M each way measures 100 Mbit/s within 5 % (iperf3, once the
  bucket, which starts full, ran dry), with the wire's headers counted as tbf counts them.
- tuning: the node-wide and the pod's own sysctls are set in the pod's namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys

import pytest

from helpers import require_root_and
from k8snetlab import spec
from k8snetlab.cluster import Cluster
from k8snetlab.errors import K8sNetLabError, SpecError
from leftover_check import running

pytestmark = pytest.mark.integration

PY = sys.executable
TCP_WHO = ("import socket,sys\n"
           "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
           "s.bind(('',int(sys.argv[1]))); s.listen(16)\n"
           "while True:\n c,a=s.accept(); c.sendall(a[0].encode()); c.close()\n")
UDP_WHO = ("import socket,sys\n"
           "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('',int(sys.argv[1])))\n"
           "while True:\n d,a=s.recvfrom(100); s.sendto(a[0].encode(),a)\n")
ASK_TCP = "import socket,sys; print(socket.create_connection((sys.argv[1],int(sys.argv[2])),3).recv(100).decode())"
ASK_UDP = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(1)\n"
           "for _ in range(3):\n"
           " s.sendto(b'hi',(sys.argv[1],int(sys.argv[2])))\n"
           " try:\n  print(s.recv(100).decode()); break\n except OSError: pass\n")
RATE = 100_000_000            # the annotation: 100M
SYSCTL_NODE = ("net.ipv4.conf.eth0.arp_filter", "1")   # (IFNAME: the reference 1.1.1 CHECK fails on it)
SYSCTL_POD = ("net.ipv4.ip_local_port_range", "40000 41000")


def who(name: str, node: str, host_port: int, **meta: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **meta},
            "spec": {"nodeName": node, "containers": [
                {"name": "tcp", "command": [PY, "-c", TCP_WHO, "80"],
                 "ports": [{"containerPort": 80, "hostPort": host_port}]},
                {"name": "udp", "command": [PY, "-c", UDP_WHO, "53"],
                 "ports": [{"containerPort": 53, "hostPort": host_port + 1, "protocol": "UDP"}]}]}}


def iperf_pod(name: str, node: str, **meta: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **meta},
            "spec": {"nodeName": node,
                     "securityContext": {"sysctls": [{"name": SYSCTL_POD[0], "value": SYSCTL_POD[1]}]},
                     "containers": [{"name": "iperf", "command": ["iperf3", "-s"], "ports": [{"containerPort": 5201}]}]}}


def cluster_file(variant: str) -> dict:
    cni = {"ours": {"type": "host-gw"}, "calico": {"type": "ipip"}, "calico-reference": {"type": "ipip"},
           "reference": {"type": "bridge", "reference": True}}[variant]
    cni["chain"] = {"plugins": ["tuning", "bandwidth", "portmap"], "sysctl": dict([SYSCTL_NODE]),
                    "reference": variant == "calico-reference"}
    return {"name": f"chain-{variant}",
            "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.0.0/24"}],
                         "hosts": [{"name": "client", "ip": "192.168.0.100"}]},
            "nodes": [{"name": "node1", "ip": "192.168.0.11"}, {"name": "node2", "ip": "192.168.0.12"}],
            "cni": cni,
            "workloads": [who("web", "node1", 8080), who("far", "node2", 8090),
                          iperf_pod("shaped", "node1", annotations={"kubernetes.io/ingress-bandwidth": "100M",
                                                                    "kubernetes.io/egress-bandwidth": "100M"}),
                          {**iperf_pod("peer", "node1"), "spec": {
                              "nodeName": "node1", "containers": [{"name": "iperf", "command": ["iperf3", "-s"],
                                                                   "ports": [{"containerPort": 5201}]}]}}]}


@pytest.fixture(scope="module", params=["ours", "reference"] + (["calico", "calico-reference"] if os.environ.get("K8SNETLAB_CHAIN_ALL") else []))
def cluster(request):
    require_root_and("mnexec", "iptables", "iptables-save", "tc", "iperf3", "nsenter")
    if "reference" in request.param:
        for p in ("bridge", "host-local", "portmap", "bandwidth", "tuning"):
            if not os.access(f"/usr/lib/cni/{p}", os.X_OK):
                pytest.skip(f"/usr/lib/cni/{p} missing: apt-get install containernetworking-plugins")
    with running(Cluster(spec.from_dict(cluster_file(request.param), f"test_chained_plugins[{request.param}]"))) as c:
        c.variant = request.param
        yield c


def ask(host, ip: str, port: int, udp: bool = False) -> str:
    return host.run([PY, "-c", ASK_UDP if udp else ASK_TCP, ip, str(port)], timeout=15).stdout.strip()


def nat(cluster, node: str = "node1") -> str:
    return cluster.nodes[node].run(["iptables-save", "-t", "nat"]).stdout


# -- portmap ------------------------------------------------------------------------------------
def test_host_port_from_the_external_host(cluster):
    node_ip = cluster.nodes["node1"].ip
    client = cluster.hosts["client"]
    assert ask(client, node_ip, 8080) == client.IP()           # DNAT, the source kept
    assert ask(client, node_ip, 8081, udp=True) == client.IP()
    # the other node does not forward node1's hostPorts
    r = client.run([PY, "-c", ASK_TCP, cluster.nodes["node2"].ip, "8080"], check=False)
    assert r.returncode != 0


def test_host_port_from_another_node(cluster):
    node_ip = cluster.nodes["node1"].ip
    node2 = cluster.nodes["node2"]
    assert ask(node2, node_ip, 8080) == node2.ip
    if cluster.variant != "reference":     # host-gw and ipip route pod CIDRs between nodes; bridge does not
        far = cluster.pods["far"]
        assert ask(far, node_ip, 8080) == far.ip


def test_hairpin_through_the_node_shows_a_node_address(cluster):
    web = cluster.pods["web"]
    seen = ask(web, cluster.nodes["node1"].ip, 8080)
    node_addrs = cluster.nodes["node1"].run(["ip", "-4", "-o", "addr", "show"]).stdout
    assert seen != web.ip and f" {seen}/" in node_addrs
    # and the node itself reaches it at its own address and at 127.0.0.1 (route_localnet)
    assert ask(cluster.nodes["node1"], cluster.nodes["node1"].ip, 8080) == cluster.nodes["node1"].ip
    assert ask(cluster.nodes["node1"], "127.0.0.1", 8080) != ""


def test_rules_in_the_reference_layout(cluster):
    rules = nat(cluster)
    web = cluster.pods["web"]
    assert "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT" in rules
    assert "-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT" in rules
    assert "-j CNI-HOSTPORT-MASQ" in rules and "-j MASQUERADE" in rules
    assert f"--to-destination {web.ip}:80" in rules and f"--to-destination {web.ip}:53" in rules
    hairpin = [line.split()[3] for line in rules.splitlines()
               if line.endswith("--dport 8080 -j CNI-HOSTPORT-SETMARK") and line.split()[2] == "-s"]
    assert "127.0.0.1/32" in hairpin and any(ipaddress.ip_address(web.ip) in ipaddress.ip_network(n) for n in hairpin
                                              if n != "127.0.0.1/32"), hairpin


def test_del_leaves_no_rule_and_check_notices_a_deleted_one(cluster):
    server = cluster.kubelets["node1"].server
    before = server.requests if server is not None else 0
    cluster.add_pod(who("temp", "node1", 9090, annotations={"kubernetes.io/egress-bandwidth": "10M"}))
    if "reference" not in cluster.variant:   # main, tuning, bandwidth, portmap: each exec'd shim asked the server
        assert server.requests - before >= 4
        assert all((cluster.state.cni_bin / t).is_file() for t in ("portmap", "bandwidth", "tuning"))
    temp = cluster.pods["temp"]
    chains = {line.split()[0][1:] for line in nat(cluster).splitlines() if line.startswith(":CNI-DN-")}
    ours = [c for c in chains if f"-A {c} -p tcp -m tcp --dport 9090 -j DNAT" in nat(cluster)]
    assert len(ours) == 1
    if "reference" not in cluster.variant:   # the reference portmap 1.1.1's CHECK also asks ip6tables for
        cluster.check_pod("temp")         # the pod's chain, which an IPv4 pod never has: it always fails
    cluster.nodes["node1"].run(["iptables", "-t", "nat", "-D", ours[0], "-p", "tcp", "-m", "tcp", "--dport",
                                "9090", "-j", "DNAT", "--to-destination", f"{temp.ip}:80"])
    with pytest.raises(K8sNetLabError):
        cluster.check_pod("temp")
    # the scheduler will not put a second holder of 9090/TCP on node1
    with pytest.raises(SpecError, match="hostPort 9090/TCP on node node1 is already taken by pod temp"):
        cluster.add_pod(who("temp2", "node1", 9090))
    ifbs_before = cluster.nodes["node1"].run(["ip", "-o", "link", "show", "type", "ifb"]).stdout
    cluster.delete_pod("temp")
    after = nat(cluster)
    assert ours[0] not in after and temp.ip not in after and "9090" not in after
    ifbs_after = cluster.nodes["node1"].run(["ip", "-o", "link", "show", "type", "ifb"]).stdout
    assert len(ifbs_after.splitlines()) == len(ifbs_before.splitlines()) - 1


# -- bandwidth ----------------------------------------------------------------------------------
def measure(cluster, direction: str, seconds: float = 5, steady: float = 2) -> float:
    """iperf3 goodput into (ingress) or out of (egress) ``shaped``, from ``peer`` on the same
    node, in bits/s, as the receiver counts it (the receiver is iperf3's client, run with -R),
    over the half-second intervals after the bucket ran dry. The bucket starts full: 512 MiB
    (the kubelet's "no limit" burst) pass at line rate first, in a time that depends on the
    machine's load; from the first interval at no more than 1.5 x the rate on, the sender is
    held to the rate, and at least ``steady`` seconds of that are measured."""
    shaped, peer = cluster.pods["shaped"], cluster.pods["peer"]
    receiver, sender = (shaped, peer) if direction == "ingress" else (peer, shaped)
    out = receiver.run(["iperf3", "-c", sender.ip, "-R", "-t", str(seconds), "-i", "0.5", "-J"],
                       timeout=seconds + 30).stdout
    intervals = [i["sum"] for i in json.loads(out)["intervals"]]
    dry = next((k for k, i in enumerate(intervals) if i["bits_per_second"] <= 1.5 * RATE), None)
    after = intervals[dry + 1:] if dry is not None else []
    held = sum(i["seconds"] for i in after)
    assert held >= steady, (f"{direction}: the bucket was not dry {steady} s before the end of a {seconds} s run: "
                            f"{[round(i['bits_per_second'] / 1e6) for i in intervals]} Mbit/s")
    return sum(i["bytes"] for i in after) * 8 / held


def wire_rate(goodput: float, mtu: int = 1500) -> float:
    """What tbf counted: each full segment of mtu-52 payload bytes is an mtu+14 byte frame."""
    return goodput * (mtu + 14) / (mtu - 52)


@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_bandwidth_annotation_limits_the_pod(cluster, direction):
    goodput = measure(cluster, direction)
    rate = wire_rate(goodput, cluster.mode.mtu)
    print(f"{cluster.variant} {direction}: goodput {goodput / 1e6:.2f} Mbit/s, on the wire {rate / 1e6:.2f} Mbit/s")
    assert abs(rate - RATE) <= 0.05 * RATE, f"{direction} {rate / 1e6:.1f} Mbit/s is not 100 within 5 %"


def test_bandwidth_layout(cluster):
    node = cluster.nodes["node1"]
    qd = node.run(["tc", "qdisc", "show"]).stdout
    assert "tbf" in qd and "ingress ffff:" in qd
    ifb = [line.split(":")[1].strip().split("@")[0] for line in
           node.run(["ip", "-o", "link", "show", "type", "ifb"]).stdout.splitlines()]
    assert len(ifb) == 1 and ifb[0].startswith("bwp")
    assert "rate 100Mbit" in node.run(["tc", "qdisc", "show", "dev", ifb[0]]).stdout
    if "reference" not in cluster.variant:   # (see above: the reference portmap's CHECK)
        cluster.check_pod("shaped")


# -- tuning -------------------------------------------------------------------------------------
def test_sysctls_set_in_the_pod(cluster):
    shaped = cluster.pods["shaped"]
    read = lambda key: shaped.run(["sysctl", "-n", key]).stdout.split()
    assert read(SYSCTL_NODE[0]) == ["1"]
    assert read(SYSCTL_POD[0]) == SYSCTL_POD[1].split()
    # only the pods that asked: peer keeps the default
    assert cluster.pods["peer"].run(["sysctl", "-n", SYSCTL_POD[0]]).stdout.split() != SYSCTL_POD[1].split()
    # and the node's own namespace is untouched
    assert cluster.nodes["node1"].run(["sysctl", "-n", SYSCTL_POD[0]]).stdout.split() != SYSCTL_POD[1].split()
