"""Routed underlays built from a Python topology file: ``leaf_spine`` (2 leaves x 2 nodes,
2 spines, so the router graph has a loop) carries pod traffic between every pair of pods;
every router has a route to every subnet; ``k8snetlab up FILE --param ...`` builds the size
asked for and tears it down on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, require_root_and
from leftover_check import running

from k8snetlab import hoststat, naming, spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration

LEAF_SPINE = REPO / "topologies" / "leaf_spine.py"


@pytest.fixture(scope="module")
def fabric():
    require_root_and("mnexec", "brctl")
    with running(Cluster.from_file(LEAF_SPINE, cni="vxlan",
                                   params={"leaves": 2, "nodes_per_leaf": 2, "spines": 2})) as c:
        yield c


def test_the_fabric_is_what_was_asked(fabric):
    assert sorted(fabric.nodes) == ["leaf1-node1", "leaf1-node2", "leaf2-node1", "leaf2-node2"]
    assert sorted(fabric.routers) == ["leaf1", "leaf2", "spine1", "spine2"]
    assert sorted(p.node_name for p in fabric.pods.values()) == sorted(fabric.nodes)   # one pod per node
    assert {n: h.spec.labels["rack"] for n, h in fabric.nodes.items()} == {
        "leaf1-node1": "leaf1", "leaf1-node2": "leaf1", "leaf2-node1": "leaf2", "leaf2-node2": "leaf2"}


def test_every_router_routes_every_subnet(fabric):
    for name, router in fabric.routers.items():
        routes = router.run(["ip", "route"]).stdout
        for s in fabric.spec.underlay.subnets:
            assert f"{s.cidr} " in routes, f"{name} has no route to {s.name} ({s.cidr}):\n{routes}"
        assert router.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"


def test_nodes_of_different_leaves_reach_each_other(fabric):
    a, b = fabric.nodes["leaf1-node1"], fabric.nodes["leaf2-node2"]
    assert a.run(["ping", "-c", "1", "-W", "2", b.ip], check=False).returncode == 0


def test_every_pod_reaches_every_pod(fabric):
    pods = list(fabric.pods.values())
    failed = [f"{s.name}@{s.node_name} -> {d.name}@{d.node_name}" for s in pods for d in pods
              if s is not d and s.run(["ping", "-c", "1", "-W", "2", d.ip], check=False).returncode != 0]
    assert not failed, failed


CONNECT_MANY = ("import socket,sys\n"
                "for _ in range(int(sys.argv[2])):\n"
                "    socket.create_connection((sys.argv[1], 8080), 2).close()\n")


def uplink_packets(c, leaf: str = "leaf1") -> dict[str, int]:
    """Packets ``leaf`` has sent towards each spine so far (tx of its uplink interfaces)."""
    (r,) = [r for r in c.spec.underlay.routers if r.name == leaf]
    dev = {naming.router_intf(leaf, i): subnet for i, (subnet, _) in enumerate(r.interfaces)}
    out = {}
    for name, counters in hoststat.ns_counters(c.routers[leaf].netns).ifaces.items():
        subnet = dev.get(name, "")
        if "-spine" in subnet:
            out[subnet.split("-", 1)[1]] = counters.tx_packets
    return out


def spread(c, connections: int = 32) -> dict[str, int]:
    """Packets leaf1 sends to each spine while a pod on leaf1 opens ``connections`` TCP
    connections to a pod on leaf2 (each with its own source port)."""
    src = next(p for p in c.pods.values() if p.node_name == "leaf1-node1")
    dst = next(p for p in c.pods.values() if p.node_name == "leaf2-node1")
    before = uplink_packets(c)
    src.run([sys.executable, "-c", CONNECT_MANY, dst.ip, str(connections)], timeout=60)
    after = uplink_packets(c)
    return {s: after[s] - before[s] for s in after}


def test_leaves_route_over_both_spines_and_vxlan_flows_use_both(fabric):
    """ECMP, hashed on the 5-tuple as a fabric does: the leaf has one route with a next hop per
    spine, and VXLAN (a UDP source port per inner flow) spreads connections over both."""
    leaf1 = fabric.routers["leaf1"]
    route = leaf1.run(["ip", "route", "show", "10.100.1.0/24"]).stdout
    assert route.count("nexthop via") == 2, route
    assert leaf1.run(["cat", "/proc/sys/net/ipv4/fib_multipath_hash_policy"]).stdout.strip() == "3"
    per_spine = spread(fabric)
    assert all(n >= 20 for n in per_spine.values()), f"vxlan: packets per spine {per_spine}"


def test_ipip_between_two_nodes_takes_one_spine():
    """The other side of the coin: IPIP has no ports to hash, so every connection from one
    node to another leaves the leaf through the same spine."""
    require_root_and("mnexec", "brctl", "tc", "clang", "bpftool")
    with running(Cluster.from_file(LEAF_SPINE, cni="ipip",
                                   params={"leaves": 2, "nodes_per_leaf": 1, "spines": 2})) as c:
        per_spine = spread(c)
    busy, idle = max(per_spine.values()), min(per_spine.values())
    assert busy >= 32 * 3 and idle < 10, f"ipip: packets per spine {per_spine}"


def test_bgp_leaves_merge_the_paths_through_both_spines():
    """Calico peering with the fabric: a leaf learns the other rack's pod routes from both
    spines and BIRD (merge paths, as in Calico's config) installs one ECMP route; plain pod
    packets then spread over the spines by their 5-tuple."""
    require_root_and("mnexec", "brctl", "bird")
    s = spec.load(LEAF_SPINE, params={"leaves": 2, "nodes_per_leaf": 1, "spines": 2})
    with running(Cluster(spec.with_cni(s, "bgp", bgp={"peerWithToR": True}))) as c:
        cidr = str(c.nodes["leaf2-node1"].spec.pod_cidr)
        leaf1 = c.routers["leaf1"]
        route = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and route.count("nexthop via") < 2:
            route = leaf1.run(["ip", "route", "show", cidr]).stdout
            time.sleep(0.2)
        assert route.count("nexthop via") == 2 and "proto bird" in route, route
        per_spine = spread(c)
    assert all(n >= 5 for n in per_spine.values()), f"bgp: packets per spine {per_spine}"

def test_cli_up_with_params_builds_that_size_and_tears_down(tmp_path):
    require_root_and("mnexec", "brctl")
    p = subprocess.Popen([sys.executable, "-m", "k8snetlab.cli", "up", str(LEAF_SPINE), "--param", "leaves=3",
                          "--param", "nodes_per_leaf=1", "--param", "spines=1"],
                         cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL)
    lines = []
    try:
        deadline = time.monotonic() + 60
        assert p.stdout is not None
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "holding the cluster" in line:
                break
        text = "".join(lines)
        assert "holding the cluster" in text, text
        assert "leaf-spine-3x1-s1" in text
        assert all(f"node leaf{i}-node1" in text for i in (1, 2, 3)), text
        assert "router spine1" in text and "router spine2" not in text
    finally:
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=60)
    assert p.returncode == 130 or "cluster stopped and removed" in rest, (p.returncode, rest)
    state = re.search(r"state in (\S+)", text).group(1)      # /run/k8snetlab/knlN
    index = int(re.search(r"knl(\d+)$", state).group(1))
    assert not os.path.exists(state), f"{state} left behind"
    assert not [n for n in os.listdir("/sys/class/net") if naming.cluster_index_of(n) == index]
