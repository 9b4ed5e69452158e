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

from k8snetlab import naming
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
