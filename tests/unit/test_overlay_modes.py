"""What the overlay modes program per peer, checked without root: vxlan's VTEP, neighbour, FDB
and route entries (and DirectRouting), ipip's routes and BPF map entries for ``Always`` and
``CrossSubnet`` on both datapaths, and the refusals (host-gw across racks, ipip ``kernel`` on
a kernel without ipip).

The node agents talk to a recording stand-in for :class:`k8snetlab.netutil.Netns` (and for the
tc BPF datapath), so the tests read the exact calls a node would make, in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from k8snetlab import ebpf, options, spec
from k8snetlab.errors import KernelFeatureMissing, SpecError
from k8snetlab.modes import MODES
from k8snetlab.modes.ipip import IpipMode, IpipOptions
from k8snetlab.modes.vxlan import Lease, VxlanMode, VxlanOptions

REPO = Path(__file__).resolve().parents[2]
TWO_RACKS = REPO / "topologies" / "two_racks.yaml"
THREE_NODES = REPO / "topologies" / "three_nodes.yaml"


class FakeNs:
    """Records every datapath verb a node agent calls (name, args, kwargs)."""

    def __init__(self, mac: str = "aa:bb:cc:00:00:01"):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.mac = mac
        self.links: dict[str, dict[str, Any]] = {"eth0": {"index": 2, "kind": None, "mac": "02:00:00:00:00:02"}}

    def _rec(self, name: str, *args: Any, **kw: Any) -> None:
        self.calls.append((name, args, kw))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def of(self, name: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for n, a, k in self.calls if n == name]

    # the verbs the modes use
    def set_sysctl(self, key, value):
        self._rec("set_sysctl", key, value)
        return "0"

    def add_link(self, ifname, kind, **attrs):
        self._rec("add_link", ifname, kind, **attrs)
        self.links[ifname] = {"index": len(self.links) + 2, "kind": kind, "mac": self.mac}
        return self.links[ifname]["index"]

    def link(self, ifname):
        return self.links.get(ifname)

    def require_index(self, ifname):
        return self.links[ifname]["index"]

    def ensure_addr(self, ifname, cidr):
        self._rec("ensure_addr", ifname, cidr)

    def link_up(self, ifname):
        self._rec("link_up", ifname)

    def set_mtu(self, ifname, mtu):
        self._rec("set_mtu", ifname, mtu)

    def add_route(self, dst, **kw):
        self._rec("add_route", dst, **kw)

    def del_route(self, dst, **kw):
        self._rec("del_route", dst, **kw)

    def replace_routes(self, routes):
        self._rec("replace_routes", [dict(r) for r in routes])
        return True

    def set_neigh(self, ifname, ip, mac):
        self._rec("set_neigh", ifname, ip, mac)

    def del_neigh(self, ifname, ip):
        self._rec("del_neigh", ifname, ip)

    def set_fdb(self, ifname, mac, dst_ip):
        self._rec("set_fdb", ifname, mac, dst_ip)

    def del_fdb(self, ifname, mac, dst_ip):
        self._rec("del_fdb", ifname, mac, dst_ip)


class FakeTc:
    """Stands in for ebpf.IpipTcDatapath: the tunnel and peer maps as plain dicts."""

    def __init__(self):
        self.tunnels: dict[str, str] = {}
        self.peers: set[str] = set()
        self.attaches = 0

    def attach(self):
        self.attaches += 1

    def add_peer(self, ip):
        self.peers.add(ip)

    def del_peer(self, ip):
        self.peers.discard(ip)

    def set_tunnel(self, cidr, remote):
        self.tunnels[cidr] = remote

    def del_tunnel(self, cidr):
        self.tunnels.pop(cidr, None)


def fake_cluster(path: Path, tmp_path: Path):
    s = spec.load(path)
    nodes = {}
    for n in s.nodes:
        d = tmp_path / n.name
        d.mkdir()
        nodes[n.name] = SimpleNamespace(name=n.name, spec=n, state_dir=d, netns=f"/nonexistent/{n.name}")
    cluster = SimpleNamespace(spec=s, nodes=nodes, state=SimpleNamespace(bpf_dir=tmp_path / "bpf"))
    return cluster, nodes


# ------------------------------------------------------------------------------------- vxlan

def test_vxlan_is_registered_with_flannel_defaults():
    assert "vxlan" in MODES.names()
    mode = MODES.get("vxlan")
    assert mode is VxlanMode and mode.pod_mtu == 1450
    o = VxlanOptions()
    assert (o.vni, o.port, o.direct_routing) == (1, 8472, False)


def test_vxlan_start_node_makes_the_vtep_and_publishes_its_lease(tmp_path):
    cluster, nodes = fake_cluster(TWO_RACKS, tmp_path)
    mode = VxlanMode(cluster, VxlanOptions())
    node, ns = nodes["node-a1"], FakeNs(mac="aa:bb:cc:00:00:a1")
    mode.start_node(node, ns)
    (args, kw), = ns.of("add_link")
    assert args == ("flannel.1", "vxlan")
    assert kw == {"vxlan_id": 1, "vxlan_port": 8472, "vxlan_local": "10.100.0.11", "vxlan_link": 2,
                  "vxlan_learning": 0, "mtu": 1450}
    assert ns.of("ensure_addr") == [(("flannel.1", "10.244.0.0/32"), {})]
    assert ("flannel.1",) in [a for a, _ in ns.of("link_up")]
    env = (node.state_dir / "subnet.env").read_text()
    assert "FLANNEL_MTU=1450" in env and "FLANNEL_SUBNET=10.244.0.1/24" in env
    lease = json.loads((node.state_dir / "flannel-lease.json").read_text())
    assert lease == {"Node": "node-a1", "PublicIP": "10.100.0.11", "Subnet": "10.244.0.0/24",
                     "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": "aa:bb:cc:00:00:a1"}}


def started(mode, nodes):
    for i, node in enumerate(nodes.values()):
        mode.start_node(node, FakeNs(mac=f"aa:bb:cc:00:00:{i:02x}"))


def test_vxlan_add_peer_programs_neighbour_fdb_then_route(tmp_path):
    cluster, nodes = fake_cluster(TWO_RACKS, tmp_path)
    mode = VxlanMode(cluster, VxlanOptions())
    started(mode, nodes)
    ns = FakeNs()
    for peer in ("node-a2", "node-b1"):      # same rack and across racks alike
        mode.add_peer(nodes["node-a1"], ns, nodes[peer])
    b1 = mode.lease(nodes["node-b1"])
    assert b1.vtep_ip == "10.244.2.0" and b1.public_ip == "10.100.1.11"
    assert ns.names() == ["set_neigh", "set_fdb", "add_route"] * 2   # route last, as flannel
    assert ns.calls[3:] == [
        ("set_neigh", ("flannel.1", "10.244.2.0", b1.vtep_mac), {}),
        ("set_fdb", ("flannel.1", b1.vtep_mac, "10.100.1.11"), {}),
        ("add_route", ("10.244.2.0/24",), {"gateway": "10.244.2.0", "dev": "flannel.1", "onlink": True}),
    ]


def test_vxlan_remove_peer_takes_back_all_three(tmp_path):
    cluster, nodes = fake_cluster(THREE_NODES, tmp_path)
    mode = VxlanMode(cluster, VxlanOptions())
    started(mode, nodes)
    ns = FakeNs()
    mode.remove_peer(nodes["node1"], ns, nodes["node3"])
    n3 = mode.lease(nodes["node3"])
    assert ns.calls == [("del_route", ("10.244.2.0/24",), {}),
                        ("del_neigh", ("flannel.1", "10.244.2.0"), {}),
                        ("del_fdb", ("flannel.1", n3.vtep_mac, "192.168.1.131"), {})]


def test_vxlan_direct_routing_is_plain_inside_a_subnet_only(tmp_path):
    cluster, nodes = fake_cluster(TWO_RACKS, tmp_path)
    mode = VxlanMode(cluster, VxlanOptions(direct_routing=True))
    started(mode, nodes)
    ns = FakeNs()
    mode.add_peer(nodes["node-a1"], ns, nodes["node-a2"])
    assert ns.calls == [("add_route", ("10.244.1.0/24",), {"gateway": "10.100.0.12", "dev": "eth0"})]
    ns = FakeNs()
    mode.add_peer(nodes["node-a1"], ns, nodes["node-b2"])
    assert ns.names() == ["set_neigh", "set_fdb", "add_route"]


def test_vxlan_peer_without_lease_is_an_error(tmp_path):
    cluster, nodes = fake_cluster(THREE_NODES, tmp_path)
    mode = VxlanMode(cluster, VxlanOptions())
    with pytest.raises(Exception, match="node2 has no flannel lease"):
        mode.add_peer(nodes["node1"], FakeNs(), nodes["node2"])


def test_vxlan_options_from_the_cluster_file():
    o = options.parse(VxlanOptions, {"VNI": 42, "Port": 4789, "DirectRouting": True}, "f: cni.vxlan")
    assert (o.vni, o.port, o.direct_routing) == (42, 4789, True)
    for bad, what in (({"VNI": 0}, "VNI"), ({"VNI": 10_000_000}, "VNI"), ({"Port": 70000}, "Port"),
                      ({"vni": 1}, "unknown option 'vni'"), ({"DirectRouting": "yes"}, "DirectRouting")):
        with pytest.raises(SpecError, match=what):
            options.parse(VxlanOptions, bad, "f: cni.vxlan")


def test_vxlan_device_name_follows_the_vni(tmp_path):
    cluster, _ = fake_cluster(THREE_NODES, tmp_path)
    assert VxlanMode(cluster, VxlanOptions(vni=9_999_999)).vtep == "flannel.9999999"


def test_lease_vtep_address_is_the_pod_cidr_network():
    lease = Lease("n", "192.168.1.2", "10.244.7.0/24", 1, "aa:bb:cc:dd:ee:ff")
    assert lease.vtep_ip == "10.244.7.0"


def test_vxlan_applies_to_every_underlay():
    for path in (THREE_NODES, TWO_RACKS):
        assert spec.load(path, cni="vxlan").cni.type == "vxlan"
    assert spec.load(REPO / "topologies" / "leaf_spine.py", cni="vxlan").cni.type == "vxlan"


# ------------------------------------------------------------------------------------- host-gw

def test_host_gw_on_two_racks_names_the_nodes_and_suggests_vxlan():
    with pytest.raises(SpecError) as e:
        spec.load(TWO_RACKS, cni="host-gw")
    line = str(e.value)
    assert "\n" not in line
    assert str(TWO_RACKS) in line and "host-gw" in line
    assert "node-a1" in line and "node-b1" in line and "rack-a" in line and "rack-b" in line
    assert "vxlan" in line


# ------------------------------------------------------------------------------------- ipip

def ipip(tmp_path, path, mode_name, datapath):
    cluster, nodes = fake_cluster(path, tmp_path)
    mode = IpipMode(cluster, IpipOptions(datapath=datapath, ipip_mode=mode_name))
    return mode, nodes


def test_crosssubnet_kernel_routes_plain_in_the_rack_and_tunl0_across(tmp_path):
    mode, nodes = ipip(tmp_path, TWO_RACKS, "CrossSubnet", "kernel")
    ns = FakeNs()
    for peer in ("node-a2", "node-b1", "node-b2"):
        mode.add_peer(nodes["node-a1"], ns, nodes[peer])
    assert ns.calls == [
        ("add_route", ("10.244.1.0/24",), {"gateway": "10.100.0.12", "dev": "eth0"}),
        ("add_route", ("10.244.2.0/24",), {"gateway": "10.100.1.11", "dev": "tunl0", "onlink": True}),
        ("add_route", ("10.244.3.0/24",), {"gateway": "10.100.1.12", "dev": "tunl0", "onlink": True}),
    ]


def test_always_kernel_tunnels_every_peer(tmp_path):
    mode, nodes = ipip(tmp_path, TWO_RACKS, "Always", "kernel")
    ns = FakeNs()
    mode.add_peer(nodes["node-a1"], ns, nodes["node-a2"])
    assert ns.calls == [("add_route", ("10.244.1.0/24",), {"gateway": "10.100.0.12", "dev": "tunl0",
                                                           "onlink": True})]


def test_kernel_start_node_makes_tunl0_with_the_pod_mtu(tmp_path):
    mode, nodes = ipip(tmp_path, TWO_RACKS, "CrossSubnet", "kernel")
    ns = FakeNs()
    mode.start_node(nodes["node-a1"], ns)
    assert ns.of("add_link") == [(("tunl0", "ipip"), {})]
    assert ns.of("set_mtu") == [(("tunl0", 1480), {})]


def test_crosssubnet_ebpf_maps_only_peers_across_subnets(tmp_path):
    mode, nodes = ipip(tmp_path, TWO_RACKS, "CrossSubnet", "ebpf")
    tc = mode._tc["node-a1"] = FakeTc()
    ns = FakeNs()
    for peer in ("node-a2", "node-b1", "node-b2"):
        mode.add_peer(nodes["node-a1"], ns, nodes[peer])
    assert tc.tunnels == {"10.244.2.0/24": "10.100.1.11", "10.244.3.0/24": "10.100.1.12"}
    assert tc.peers == {"10.100.1.11", "10.100.1.12"}
    # in the rack: plain, next hop the peer; across: next hop the ToR, outer header to the peer
    assert ns.calls == [
        ("add_route", ("10.244.1.0/24",), {"gateway": "10.100.0.12", "dev": "eth0"}),
        ("add_route", ("10.244.2.0/24",), {"gateway": "10.100.0.1", "dev": "eth0", "mtu": 1480}),
        ("add_route", ("10.244.3.0/24",), {"gateway": "10.100.0.1", "dev": "eth0", "mtu": 1480}),
    ]
    mode.remove_peer(nodes["node-a1"], ns, nodes["node-b1"])
    assert tc.tunnels == {"10.244.3.0/24": "10.100.1.12"} and tc.peers == {"10.100.1.12"}


def test_always_ebpf_on_a_flat_underlay_goes_straight_to_the_peer(tmp_path):
    mode, nodes = ipip(tmp_path, THREE_NODES, "Always", "ebpf")
    tc = mode._tc["node1"] = FakeTc()
    ns = FakeNs()
    mode.add_peer(nodes["node1"], ns, nodes["node2"])
    assert tc.tunnels == {"10.244.1.0/24": "192.168.1.130"}
    assert ns.calls == [("add_route", ("10.244.1.0/24",), {"gateway": "192.168.1.130", "dev": "eth0",
                                                           "mtu": 1480})]


def test_crosssubnet_on_a_flat_underlay_is_host_gw_like(tmp_path):
    mode, nodes = ipip(tmp_path, THREE_NODES, "CrossSubnet", "ebpf")
    tc = mode._tc["node1"] = FakeTc()
    mode.add_peer(nodes["node1"], FakeNs(), nodes["node3"])
    assert tc.tunnels == {} and tc.peers == set()


def test_crosssubnet_ebpf_attaches_its_programs_only_when_a_peer_needs_a_tunnel(tmp_path):
    # one subnet: no program on eth0, so the plain path is bgp's; across racks: attached once
    mode, nodes = ipip(tmp_path, THREE_NODES, "CrossSubnet", "ebpf")
    tc = mode._idle_tc["node1"] = FakeTc()
    mode.add_peers(nodes["node1"], FakeNs(), [nodes["node2"], nodes["node3"]])
    mode.add_peer(nodes["node1"], FakeNs(), nodes["node3"])
    assert tc.attaches == 0 and mode.bpf_datapath("node1") is None
    (tmp_path / "racks").mkdir()
    mode, nodes = ipip(tmp_path / "racks", TWO_RACKS, "CrossSubnet", "ebpf")
    tc = mode._idle_tc["node-a1"] = FakeTc()
    for peer in ("node-a2", "node-b1", "node-b2"):
        mode.add_peer(nodes["node-a1"], FakeNs(), nodes[peer])
    assert tc.attaches == 1 and mode.bpf_datapath("node-a1") is tc
    assert tc.tunnels == {"10.244.2.0/24": "10.100.1.11", "10.244.3.0/24": "10.100.1.12"}


def test_kernel_datapath_without_ipip_is_refused_in_one_line(tmp_path, monkeypatch):
    mode, nodes = ipip(tmp_path, TWO_RACKS, "CrossSubnet", "kernel")
    monkeypatch.setattr(ebpf, "kernel_has_ipip", lambda path: False)
    with pytest.raises(KernelFeatureMissing) as e:
        mode.prepare(nodes["node-a1"])
    line = str(e.value)
    assert "\n" not in line
    assert str(TWO_RACKS) in line and "cni.ipip.datapath" in line and "ebpf" in line


def test_auto_datapath_picks_ebpf_without_ipip(tmp_path, monkeypatch):
    mode, nodes = ipip(tmp_path, TWO_RACKS, "CrossSubnet", "auto")
    monkeypatch.setattr(ebpf, "kernel_has_ipip", lambda path: False)
    monkeypatch.setattr(ebpf, "compile_object", lambda: Path("/nonexistent.o"))
    from k8snetlab import proc
    monkeypatch.setattr(proc, "require", lambda *tools: {t: t for t in tools})
    mode.cluster.state.mount_bpffs = lambda: None
    mode.prepare(nodes["node-a1"])
    assert mode.datapath == "ebpf"


def test_the_bpf_object_is_found_once_per_cluster_and_given_to_every_node(tmp_path, monkeypatch):
    """Finding the cached object runs clang twice: once per node it was most of an ipip node
    agent's start (200 nodes: 22 s of CPU)."""
    mode, nodes = ipip(tmp_path, TWO_RACKS, "CrossSubnet", "ebpf")
    compiled = []
    monkeypatch.setattr(ebpf, "kernel_has_ipip", lambda path: False)
    monkeypatch.setattr(ebpf, "compile_object", lambda: compiled.append(1) or Path("/cache/ipip_tc-x.o"))
    from k8snetlab import proc
    monkeypatch.setattr(proc, "require", lambda *tools: {t: t for t in tools})
    mode.cluster.state.mount_bpffs = lambda: None
    mode.cluster.state.bpf_dir = tmp_path / "bpf"
    mode.prepare(nodes["node-a1"])
    for node in nodes.values():
        mode.start_node(node, FakeNs())
    assert len(compiled) == 1
    assert {str(tc.obj) for tc in mode._idle_tc.values()} == {"/cache/ipip_tc-x.o"} and len(mode._idle_tc) == len(nodes)


# ------------------------------------------------------------------------------- batched routes

def batched_as_single(ns: FakeNs) -> list[tuple]:
    """The routes of replace_routes batches, written as the add_route calls they stand for."""
    out = []
    for r in [r for (batch,), _ in ns.of("replace_routes") for r in batch]:
        kw = {"gateway": r["gateway"], "dev": r["dev"]}
        if r.get("onlink"):
            kw["onlink"] = True
        if r.get("mtu"):
            kw["mtu"] = r["mtu"]
        out.append(("add_route", (r["dst"],), kw))
    return out


@pytest.mark.parametrize("mode_name,datapath", [("CrossSubnet", "kernel"), ("Always", "kernel"),
                                                ("CrossSubnet", "ebpf"), ("Always", "ebpf")])
def test_ipip_add_peers_batches_what_add_peer_does(tmp_path, monkeypatch, mode_name, datapath):
    """A node agent at 100 nodes programs its 99 peers in one batch: the same routes (and,
    ebpf, the same map entries) as one add_peer per peer, in one replace_routes call."""
    import k8snetlab.modes.ipip as ipip_mod
    monkeypatch.setattr(ipip_mod, "BATCH_MIN", 2)       # three peers here stand for 99
    peers = ("node-a2", "node-b1", "node-b2")
    mode, nodes = ipip(tmp_path, TWO_RACKS, mode_name, datapath)
    one, tc_one = FakeNs(), mode._tc.setdefault("node-a1", FakeTc())
    for peer in peers:
        mode.add_peer(nodes["node-a1"], one, nodes[peer])
    many, tc_many = FakeNs(), FakeTc()
    mode._tc["node-a1"] = tc_many
    mode.add_peers(nodes["node-a1"], many, [nodes[p] for p in peers])
    assert many.names() == ["replace_routes"]
    assert batched_as_single(many) == one.calls
    assert (tc_many.tunnels, tc_many.peers) == (tc_one.tunnels, tc_one.peers)


def test_host_gw_add_peers_is_one_batch_of_routes_via_each_peer(tmp_path, monkeypatch):
    import k8snetlab.modes.host_gw as host_gw_mod
    cluster, nodes = fake_cluster(THREE_NODES, tmp_path)
    for i, n in enumerate(nodes.values(), 1):
        n.pid = i
    mode = MODES.get("host-gw")(cluster, MODES.get("host-gw").Options())
    ns = FakeNs()
    mode.add_peers(nodes["node1"], ns, [nodes["node2"], nodes["node3"]])     # a few: by netlink
    assert ns.names() == ["add_route", "add_route"]
    monkeypatch.setattr(host_gw_mod, "BATCH_MIN", 2)
    ns = FakeNs()
    mode.add_peers(nodes["node1"], ns, [nodes["node2"], nodes["node3"]])
    assert ns.calls == [("replace_routes", ([
        {"dst": str(nodes[n].spec.pod_cidr), "gateway": str(nodes[n].spec.ip), "dev": "eth0"}
        for n in ("node2", "node3")],), {})]
