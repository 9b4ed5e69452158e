"""The pure parts of experiments/cni_modes.py: which modes run on which underlay (and why the
others are skipped), where the probe pods go, how a captured packet is read, the summary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from k8snetlab import results, spec
from cli_harness import experiment_module

REPO = Path(__file__).resolve().parents[2]
THREE_NODES = REPO / "topologies" / "three_nodes.yaml"
TWO_RACKS = REPO / "topologies" / "two_racks.yaml"
LEAF_SPINE = REPO / "topologies" / "leaf_spine.py"


@pytest.fixture(scope="module")
def cm():
    return experiment_module("cni_modes.py", "cni_modes_under_test")


ALL = ("bridge", "host-gw", "vxlan", "ipip", "ipip-crosssubnet", "bgp")
ONLY_OURS = ("bridge", "host-gw", "vxlan", "ipip")     # a checkout without bgp


def test_flat_runs_every_mode_and_says_why_one_is_missing(cm):
    todo, skipped = cm.plan(spec.load(THREE_NODES), ALL, ONLY_OURS)
    assert [v.label for v, _ in todo] == ["bridge", "host-gw", "vxlan", "ipip", "ipip-crosssubnet"]
    assert "bgp" in skipped and "is not installed" in skipped["bgp"]
    by = {v.label: s for v, s in todo}
    assert by["ipip"].cni.options.ipip_mode == "Always"
    assert by["ipip-crosssubnet"].cni.options.ipip_mode == "CrossSubnet"
    assert by["ipip-crosssubnet"].cni.options.datapath == "auto"      # the file's own setting kept
    assert all(s.workloads == () for s in by.values())                # the probes replace them


def test_two_racks_skips_host_gw_with_its_reason(cm):
    todo, skipped = cm.plan(spec.load(TWO_RACKS), ALL, ONLY_OURS)
    assert "host-gw" not in [v.label for v, _ in todo]
    assert "node-a1" in skipped["host-gw"] and "vxlan" in skipped["host-gw"]
    assert [v.label for v, _ in todo] == ["bridge", "vxlan", "ipip", "ipip-crosssubnet"]


def test_modes_subset(cm):
    todo, skipped = cm.plan(spec.load(THREE_NODES), ("vxlan",), ONLY_OURS)
    assert [v.label for v, _ in todo] == ["vxlan"] and skipped == {}


def test_placement_and_scenarios(cm):
    flat = cm.placement(spec.load(THREE_NODES))
    assert flat == cm.Placement("node1", "node2", None)
    racks = cm.placement(spec.load(TWO_RACKS))
    assert racks == cm.Placement("node-a1", "node-a2", "node-b1")
    assert racks.probes() == {"probe-a1": "node-a1", "probe-a2": "node-a1", "probe-b": "node-a2",
                              "probe-c": "node-b1"}
    vxlan = next(v for v in cm.VARIANTS if v.label == "vxlan")
    bridge = next(v for v in cm.VARIANTS if v.label == "bridge")
    assert [s.name for s in cm.scenarios(vxlan, racks)] == ["pod-same-node", "pod-cross-node", "pod-cross-subnet"]
    assert [s.name for s in cm.scenarios(vxlan, flat)] == ["pod-same-node", "pod-cross-node"]
    assert [s.name for s in cm.scenarios(bridge, racks)] == ["pod-same-node"]
    leaf = cm.placement(spec.load(LEAF_SPINE, params={"nodes_per_leaf": 1}))
    assert leaf == cm.Placement("leaf1-node1", None, "leaf2-node1")


def test_probe_manifest_pins_the_node(cm):
    m = cm.probe_manifest("probe-b", "node2")
    from k8snetlab import manifests
    (pod,) = manifests.parse_workload(m, "probe").pods()
    assert pod.node_name == "node2" and pod.name == "probe-b"


# ------------------------------------------------------------------------------ the wire

def packets():
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.packet import Raw
    inner = IP(src="10.244.0.2", dst="10.244.1.2") / ICMP(type=8) / Raw(b"x" * 1000)
    reply = IP(src="10.244.1.2", dst="10.244.0.2") / ICMP(type=0) / Raw(b"x" * 1000)
    raw = [
        Ether() / inner,
        Ether() / IP(src="192.168.1.129", dst="192.168.1.130", proto=4) / inner,
        Ether() / IP(src="192.168.1.129", dst="192.168.1.130") / UDP(sport=40000, dport=8472) /
        VXLAN(vni=1) / Ether() / inner,
        Ether() / reply,                                                     # not a request
        Ether() / IP(src="10.244.0.3", dst="10.244.1.2") / ICMP(type=8),    # another source
    ]
    return [Ether(bytes(p)) for p in raw]      # as read from a pcap: dissected from bytes


def test_wire_packets_reads_each_encapsulation(cm):
    got = cm.wire_packets(packets(), "10.244.0.2", "10.244.1.2")
    assert [(p.kind, p.outer_len, p.inner_len, p.overhead) for p in got] == [
        ("plain", 1028, 1028, 0), ("ipip", 1048, 1028, 20), ("vxlan", 1078, 1028, 50)]
    assert (got[2].vni, got[2].udp_dport) == (1, 8472)


# ------------------------------------------------------------------------------ summary

def rows(values):
    out = []
    for (mode, scenario, metric), vs in values.items():
        for i, v in enumerate(vs, start=1):
            out.append(results.Row("r", "t", "cni_modes", "three-nodes", mode, "kernel", scenario, "a", "b",
                                   i, metric, v, results.METRIC_UNITS[metric], 1500, "k"))
    return out


def test_summary_shows_ratios_wire_and_skips(cm):
    data = {("host-gw", "pod-cross-node", "tcp_throughput"): [10, 10, 10],
            ("vxlan", "pod-cross-node", "tcp_throughput"): [7.6, 8, 8.4],       # 0.8 [0.76, 0.84]: met
            ("ipip-crosssubnet", "pod-cross-node", "tcp_throughput"): [9, 9, 9],  # 0.9: missed
            ("vxlan", "pod-cross-node", "encap_overhead"): [50],
            ("vxlan", "pod-cross-node", "wire_ip_bytes"): [1078],
            ("vxlan", "pod-cross-node", "inner_ip_bytes"): [1028],
            ("ipip-crosssubnet", "pod-cross-node", "encap_overhead"): [20],
            ("ipip-crosssubnet", "pod-cross-node", "wire_ip_bytes"): [1048],
            ("ipip-crosssubnet", "pod-cross-node", "inner_ip_bytes"): [1028]}
    text = cm.summary(rows(data), ["host-gw", "vxlan", "ipip-crosssubnet"], {"bgp": "is not installed"})
    assert re.search(r"met +vxlan cross-node TCP >= 0.7 x host-gw: 0\.800 \[0\.7\d+, 0\.8\d+\]", text), text
    assert re.search(r"MISSED +ipip CrossSubnet in one subnet TCP within 0.95-1.05 x host-gw: 0\.90", text), text
    assert re.search(r"n/a +bgp cross-node TCP", text)
    lines = text.splitlines()
    vx = next(line for line in lines if line.startswith("vxlan ") and "1078" in line)
    assert vx.split()[-1] == "yes"
    cs = next(line for line in lines if line.startswith("ipip-crosssubnet ") and "1048" in line)
    assert "NO (expected 0)" in cs              # encapsulated inside a subnet: flagged
    assert "bgp: is not installed" in text


def test_a_target_inside_the_interval_is_inconclusive_never_met(cm):
    data = {("host-gw", "pod-cross-node", "tcp_throughput"): [10, 10, 10],
            ("vxlan", "pod-cross-node", "tcp_throughput"): [6, 8, 9]}     # mean 0.77, interval crosses 0.7
    text = cm.summary(rows(data), ["host-gw", "vxlan"], {})
    assert re.search(r"inconclusive +vxlan cross-node TCP >= 0.7", text), text
    assert not re.search(r"met +vxlan", text)


def test_bgp_peers_with_the_tors_on_a_routed_underlay(cm):
    from k8snetlab.modes import MODES
    if "bgp" not in MODES.names():
        pytest.skip("no bgp mode in this checkout")
    todo, _ = cm.plan(spec.load(TWO_RACKS), ("bgp",), MODES.names())
    ((v, s),) = todo
    assert s.cni.sections["bgp"]["peerWithToR"] is True
    todo, _ = cm.plan(spec.load(THREE_NODES), ("bgp",), MODES.names())
    assert "peerWithToR" not in (todo[0][1].cni.sections.get("bgp") or {})


def test_next_hops_of_the_most_specific_route(cm):
    ecmp = [{"dst": "10.100.1.0/24", "flags": [],
             "nexthops": [{"gateway": "10.101.0.2", "dev": "eth1", "weight": 1, "flags": []},
                          {"gateway": "10.101.0.6", "dev": "eth2", "weight": 1, "flags": []}]}]
    assert cm.next_hops(ecmp) == [("eth1", "10.101.0.2"), ("eth2", "10.101.0.6")]
    # 'ip route show match' lists every covering route: the /24 wins over the default
    single = [{"dst": "default", "gateway": "10.0.0.1", "dev": "eth9"},
              {"dst": "10.244.2.0/24", "gateway": "10.101.0.6", "dev": "eth2", "protocol": "bird"}]
    assert cm.next_hops(single) == [("eth2", "10.101.0.6")]
    assert cm.next_hops([]) == []


def test_ecmp_spread(cm):
    assert cm.ecmp_spread({"a": 30, "b": 34}) == (2, 34 / 64)
    assert cm.ecmp_spread({"a": 0, "b": 64}) == (1, 1.0)
    assert cm.ecmp_spread({"a": 3, "b": 61}) == (1, 61 / 64)     # under 10%: not counted as used
    assert cm.ecmp_spread({"a": 0, "b": 0}) == (0, 0.0)


def test_summary_shows_the_equal_cost_paths(cm):
    data = {("vxlan", "pod-cross-subnet", "ecmp_next_hops"): [2],
            ("vxlan", "pod-cross-subnet", "ecmp_paths_used"): [2],
            ("vxlan", "pod-cross-subnet", "ecmp_max_share"): [0.55],
            ("ipip", "pod-cross-subnet", "ecmp_next_hops"): [2],
            ("ipip", "pod-cross-subnet", "ecmp_paths_used"): [1],
            ("ipip", "pod-cross-subnet", "ecmp_max_share"): [1.0]}
    text = cm.summary(rows(data), ["vxlan", "ipip"], {})
    assert "Equal-cost paths" in text
    lines = text.splitlines()
    assert next(line for line in lines if line.startswith("vxlan ") and "0.55" in line).split() == \
        ["vxlan", "2", "2", "0.55"]
    assert next(line for line in lines if line.startswith("ipip ") and line.split()[1] == "2").split() == \
        ["ipip", "2", "1", "1"]
    assert "Equal-cost paths" not in cm.summary(rows({("vxlan", "pod-cross-node", "tcp_throughput"): [5]}),
                                                  ["vxlan"], {})
