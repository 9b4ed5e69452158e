"""The eBPF IPIP datapath (k8snetlab.ebpf) between two hand-built nodes.

Two node namespaces joined by one veth (192.168.77.1/24 and .2/24, ``eth0`` on both), one
pod per node in the Calico layout: pod /32 on a ``cali*`` veth, pod default route via
169.254.1.1 onlink answered by proxy_arp, pod MTU 1480, remote pod CIDR routed host-gw style
(``via <node> dev eth0``). Without the BPF programs this is plain host-gw; with them every
pod-to-pod packet crosses the link as IP-in-IP.

Everything is created in namespaces named ``knltest<pid>-*`` and removed in the fixture's
teardown; the bpffs holding the pins is mounted under the test's tmp directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import select
import signal
import subprocess
import time

import pytest

from k8snetlab import ebpf, naming, proc
from k8snetlab.errors import KernelFeatureMissing

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, bpf(2))"),
    pytest.mark.skipif(ebpf.have_tools() is not None, reason=ebpf.have_tools() or ""),
    pytest.mark.skipif(proc.which("iperf3") is None or proc.which("tcpdump") is None,
                       reason="needs iperf3 and tcpdump (apt-get install iperf3 tcpdump)"),
]

POD_MTU = 1480
GATEWAY = naming.CALICO_GATEWAY
NODE_GW = "192.168.77.254"          # any on-link address: the node needs a default route
IPERF_PORT = 5201                   # for proxy_arp to answer for 169.254.1.1


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    name: str
    node_ip: str
    pod_cidr: str
    pod_ip: str


NODES = (NodeSpec("n1", "192.168.77.1", "10.244.1.0/24", "10.244.1.2"),
         NodeSpec("n2", "192.168.77.2", "10.244.2.0/24", "10.244.2.2"))


def ns_path(ns: str) -> str:
    return f"/run/netns/{ns}"


def ip(ns: str, *args: str) -> str:
    return proc.run(["ip", "-n", ns, *args]).stdout


def sysctl(ns: str, key: str, value: str) -> None:
    with proc.netns(ns_path(ns)):
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)


def ping(ns: str, dst: str, count: int = 5, interval: float = 0.2) -> float:
    """Average RTT in ms; raises CommandError if any reply is missing."""
    out = proc.run(["ping", "-q", "-n", "-c", str(count), "-i", str(interval), "-W", "2", dst],
                   netns=ns_path(ns)).stdout
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    assert m and " 0% packet loss" in out, out
    return float(m.group(1))


class Lab:
    """Two nodes, one pod each; remembers what it made and removes it in reverse."""

    def __init__(self, workdir: pathlib.Path, tag: str | None = None):
        self.tag = tag or f"knltest{os.getpid()}"
        self.workdir = workdir
        self.bpffs = str(workdir / "bpffs")
        self.namespaces: list[str] = []
        self.datapaths: dict[str, ebpf.IpipTcDatapath] = {}
        self.procs: list[subprocess.Popen] = []
        self.mounted = False

    def node_ns(self, n: NodeSpec) -> str:
        return f"{self.tag}-{n.name}"

    def pod_ns(self, n: NodeSpec) -> str:
        return f"{self.tag}-p{n.name[1:]}"

    def cali(self, n: NodeSpec) -> str:
        return naming.host_veth("cali", self.pod_ns(n), naming.POD_IFNAME)

    def _netns(self, name: str) -> str:
        proc.run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        ip(name, "link", "set", "lo", "up")
        return name

    def build(self) -> None:
        for n in NODES:
            self._netns(self.node_ns(n))
            self._netns(self.pod_ns(n))
        a, b = NODES
        ip(self.node_ns(a), "link", "add", "eth0", "type", "veth",
           "peer", "name", "eth0", "netns", self.node_ns(b))
        for n in NODES:
            node, pod, cali = self.node_ns(n), self.pod_ns(n), self.cali(n)
            ip(node, "addr", "add", f"{n.node_ip}/24", "dev", "eth0")
            ip(node, "link", "set", "eth0", "up")
            ip(node, "route", "add", "default", "via", NODE_GW, "dev", "eth0", "onlink")
            sysctl(node, "net.ipv4.ip_forward", "1")
            ip(node, "link", "add", cali, "mtu", str(POD_MTU), "type", "veth",
               "peer", "name", naming.POD_IFNAME, "netns", pod)
            ip(node, "link", "set", cali, "up")
            sysctl(node, f"net.ipv4.conf.{cali}.proxy_arp", "1")
            sysctl(node, f"net.ipv4.neigh.{cali}.proxy_delay", "0")
            ip(node, "route", "add", f"{n.pod_ip}/32", "dev", cali, "scope", "link")
            ip(pod, "link", "set", "eth0", "mtu", str(POD_MTU), "up")
            ip(pod, "addr", "add", f"{n.pod_ip}/32", "dev", "eth0")
            ip(pod, "route", "add", GATEWAY, "dev", "eth0", "scope", "link")
            ip(pod, "route", "add", "default", "via", GATEWAY, "dev", "eth0", "onlink")
        for n, other in ((a, b), (b, a)):
            ip(self.node_ns(n), "route", "add", other.pod_cidr, "via", other.node_ip,
               "dev", "eth0")

    def attach_ipip(self) -> None:
        if not self.mounted:
            ebpf.mount_bpffs(self.bpffs)
            self.mounted = True
        for n in NODES:
            dp = self.datapaths.get(n.name) or ebpf.IpipTcDatapath(
                name=n.name, netns_path=ns_path(self.node_ns(n)), ifname=naming.NODE_UPLINK,
                local_ip=n.node_ip, pin_dir=os.path.join(self.bpffs, n.name))
            self.datapaths[n.name] = dp
            dp.attach()
            for other in NODES:
                if other is not n:
                    dp.set_tunnel(other.pod_cidr, other.node_ip)
                    dp.add_peer(other.node_ip)

    def detach_ipip(self) -> None:
        for dp in self.datapaths.values():
            dp.detach()

    def spawn(self, ns: str, args: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(args, preexec_fn=lambda: proc.setns(ns_path(ns)), **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        proc.end_child(p, 5, sig)
        if p in self.procs:
            self.procs.remove(p)

    def iperf(self, src: NodeSpec, dst: NodeSpec, seconds: int = 2) -> float:
        """Pod-to-pod TCP throughput in Gbit/s (iperf3, one stream, default offloads)."""
        server = self.spawn(self.pod_ns(dst), ["iperf3", "-s", "-1", "-B", dst.pod_ip,
                                               "-p", str(IPERF_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 5
            while not proc.run(["ss", "-Hltn", f"sport = :{IPERF_PORT}"],
                               netns=ns_path(self.pod_ns(dst))).stdout.strip():
                assert time.monotonic() < deadline, "iperf3 server did not start listening"
                time.sleep(0.05)
            out = proc.run(["iperf3", "-c", dst.pod_ip, "-p", str(IPERF_PORT),
                            "-t", str(seconds), "-J"],
                           netns=ns_path(self.pod_ns(src)), timeout=seconds + 30).stdout
            return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
        finally:
            self.stop(server)

    def teardown(self) -> None:
        errors = []
        for p in list(self.procs):
            self.stop(p)
        for dp in self.datapaths.values():
            try:
                dp.detach()
            except Exception as e:          # keep going: the namespaces must go anyway
                errors.append(e)
        for ns in reversed(self.namespaces):
            proc.run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()
        if self.mounted:
            ebpf.umount_bpffs(self.bpffs)
            self.mounted = False
        if errors:
            raise errors[0]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("ebpf_ipip"))
    try:
        lab.build()
        try:
            lab.attach_ipip()
        except KernelFeatureMissing as e:
            pytest.skip(str(e))
        yield lab
    finally:
        lab.teardown()


def test_pods_ping_each_other(lab):
    a, b = NODES
    before = lab.datapaths["n1"].stats()
    ping(lab.pod_ns(a), b.pod_ip)
    ping(lab.pod_ns(b), a.pod_ip)
    # a full-size packet with DF: 1480 inside + 20 outside must fit the 1500-byte underlay
    proc.run(["ping", "-q", "-c", "2", "-i", "0.2", "-W", "2", "-M", "do",
              "-s", str(POD_MTU - 28), b.pod_ip], netns=ns_path(lab.pod_ns(a)))
    after = lab.datapaths["n1"].stats()
    assert after["encap"] > before["encap"] and after["decap"] > before["decap"], after
    assert after["encap_err"] == after["decap_err"] == 0, after


def test_tunnel_map_reads_back(lab):
    dp = lab.datapaths["n1"]
    assert dp.tunnels() == {"10.244.2.0/24": "192.168.77.2"}
    assert dp.peers() == {"192.168.77.2"}
    dp.set_tunnel("10.244.9.0/24", "192.168.77.9")
    dp.set_tunnel("10.244.9.0/24", "192.168.77.10")          # replace
    assert dp.tunnels()["10.244.9.0/24"] == "192.168.77.10"
    dp.del_tunnel("10.244.9.0/24")
    dp.del_tunnel("10.244.9.0/24")                          # idempotent
    dp.sync_tunnels({"10.244.2.0/24": "192.168.77.2", "10.244.3.0/24": "192.168.77.3"})
    assert dp.tunnels() == {"10.244.2.0/24": "192.168.77.2", "10.244.3.0/24": "192.168.77.3"}
    dp.sync_tunnels({"10.244.2.0/24": "192.168.77.2"})
    assert dp.tunnels() == {"10.244.2.0/24": "192.168.77.2"}
    dp.add_peer("192.168.77.9")
    dp.del_peer("192.168.77.9")
    dp.del_peer("192.168.77.9")
    assert dp.peers() == {"192.168.77.2"}
    # each node has its own maps
    assert lab.datapaths["n2"].tunnels() == {"10.244.1.0/24": "192.168.77.1"}


def test_wire_carries_ip_in_ip(lab, tmp_path):
    from scapy.layers.inet import ICMP, IP
    from scapy.utils import rdpcap

    a, b = NODES
    pcap = tmp_path / "n1-eth0.pcap"
    # --immediate-mode: without it packets wait in a TPACKET_V3 block and are lost on SIGINT
    dump = lab.spawn(lab.node_ns(a), ["tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode",
                                      "-Z", "root", "-w", str(pcap), "ip proto 4"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([dump.stderr], [], [], 10)
        assert ready and b"listening on" in dump.stderr.readline(), "tcpdump did not start"
        ping(lab.pod_ns(a), b.pod_ip, count=3)
    finally:
        lab.stop(dump, signal.SIGINT)
        dump.stderr.close()
    packets = [p for p in rdpcap(str(pcap)) if IP in p and p[IP].proto == 4]
    assert packets, "no IP protocol 4 on n1's eth0"
    seen = set()
    for p in packets:
        outer, inner = p[IP], p[IP].payload
        assert isinstance(inner, IP), p.summary()
        assert outer.flags.DF and outer.ttl == 64 and outer.ihl == 5
        seen.add((outer.src, outer.dst, inner.src, inner.dst, ICMP in inner))
    assert (a.node_ip, b.node_ip, a.pod_ip, b.pod_ip, True) in seen, seen
    assert (b.node_ip, a.node_ip, b.pod_ip, a.pod_ip, True) in seen, seen


def test_tcp_throughput_with_default_offloads(lab):
    a, b = NODES
    gbit_s = lab.iperf(a, b, seconds=2)
    stats = lab.datapaths["n1"].stats()
    assert gbit_s > 1.0, f"pod-to-pod TCP over eBPF IPIP: {gbit_s:.2f} Gbit/s"
    assert stats["encap_err"] == 0, stats


def test_detach_removes_everything_and_reattach_works(lab):
    a, b = NODES
    lab.detach_ipip()
    for n in NODES:
        node = ns_path(lab.node_ns(n))
        assert "clsact" not in proc.run(["tc", "qdisc", "show", "dev", "eth0"],
                                        netns=node).stdout
        for direction in ("egress", "ingress"):
            assert not proc.run(["tc", "filter", "show", "dev", "eth0", direction],
                                netns=node).stdout.strip()
        assert not os.path.exists(os.path.join(lab.bpffs, n.name))
    # maps.debug / progs.debug are the kernel's bpf_preload iterators, in every bpffs
    assert set(os.listdir(lab.bpffs)) <= {"maps.debug", "progs.debug"}
    lab.detach_ipip()                                    # idempotent
    ping(lab.pod_ns(a), b.pod_ip, count=2)               # plain host-gw still routes
    lab.attach_ipip()
    assert lab.datapaths["n1"].attached()
    before = lab.datapaths["n1"].stats()
    ping(lab.pod_ns(a), b.pod_ip, count=2)
    assert lab.datapaths["n1"].stats()["encap"] > before["encap"]


def test_detach_when_namespace_is_gone(lab):
    ns = f"{lab.tag}-gone"
    proc.run(["ip", "netns", "add", ns])
    try:
        ip(ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        dp = ebpf.IpipTcDatapath("gone", ns_path(ns), "eth0", "192.168.77.50",
                                 os.path.join(lab.bpffs, "gone"))
        dp.attach()
        assert dp.attached()
    finally:
        proc.run(["ip", "netns", "del", ns], check=False)
    dp.detach()
    dp.detach()
    assert not os.path.exists(os.path.join(lab.bpffs, "gone"))


def test_kernel_has_ipip_probe_leaves_nothing(lab):
    node = lab.node_ns(NODES[0])
    links = ip(node, "-o", "link", "show")
    assert isinstance(ebpf.kernel_has_ipip(ns_path(node)), bool)
    after = ip(node, "-o", "link", "show")
    assert [l for l in after.splitlines() if "knlipip" in l] == []
    assert len(after.splitlines()) <= len(links.splitlines()) + 1      # + tunl0 where ipip exists
