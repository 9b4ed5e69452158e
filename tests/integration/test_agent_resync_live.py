"""The node agents reconcile periodically, as flanneld and calico-node do (issue 14 item 5):
a route, neighbour, FDB entry, BPF map entry or tc program deleted by hand on a node comes
back within two resync periods, and pod traffic flows again."""

from __future__ import annotations

import time

import pytest

from helpers import require_root_and
from leftover_check import running
from k8snetlab import spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration

PERIOD = 0.5
# mode -> the option that sets the period (flannel / Calico spelling)
MODES = {"host-gw": "RouteCheckInterval", "vxlan": "RouteCheckInterval",
         "ipip": "routeRefreshInterval", "bgp": "routeRefreshInterval"}
PEER_CIDR = "10.244.1.0/24"        # node2's pod CIDR, as node1 routes it


def cluster_dict(cni: str) -> dict:
    return {"name": f"heal-agent-{cni}",
            "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
            "nodes": [{"name": "node1", "ip": "192.168.1.129"}, {"name": "node2", "ip": "192.168.1.130"}],
            "cni": {"type": cni, cni: {MODES[cni]: PERIOD}},
            "workloads": [{"kind": "Pod", "metadata": {"name": f"p{i}"},
                           "spec": {"nodeName": f"node{i}", "containers": [{"name": "c", "command": ["sleep", "600"]}]}}
                          for i in (1, 2)]}


@pytest.fixture(scope="module", params=list(MODES))
def cluster(request):
    require_root_and("mnexec", "brctl", "tc", "clang", "bpftool", "bird")
    with running(Cluster(spec.from_dict(cluster_dict(request.param)))) as c:
        yield c


def after_two_rounds(c) -> None:
    first = c.agent_resync.rounds
    deadline = time.monotonic() + 60
    while c.agent_resync.rounds < first + 2:
        assert time.monotonic() < deadline, "the node agents' resync stopped"
        time.sleep(0.05)


def reaches(c) -> bool:
    return c.pods["p1"].run(["ping", "-c", "1", "-W", "1", c.pods["p2"].ip], check=False).returncode == 0


def damage_then_repair(c, *cmds, on="node1", check, breaks=True) -> None:
    """Run ``cmds`` on node ``on``; ``check()`` must then be false (and pod traffic broken,
    with ``breaks``), and both back after two resync rounds."""
    node = c.nodes[on]
    assert reaches(c) and check()
    with c.agent_lock:                  # no reconcile between the damage and seeing it
        for cmd in cmds:
            node.run(cmd) if isinstance(cmd, list) else cmd()
        assert not check(), f"{cmds} did not delete what it should"
        if breaks:
            assert not reaches(c), f"{cmds} did not break pod traffic"
    after_two_rounds(c)
    assert check(), f"{c.spec.cni.type}: the deleted state did not come back within two resync periods"
    assert reaches(c), f"{c.spec.cni.type}: pod traffic still broken after two resync periods"


def test_period_is_the_mode_option(cluster):
    assert cluster.mode.resync_period == PERIOD
    assert cluster.agent_resync is not None


def test_deleted_route_comes_back(cluster):
    if cluster.spec.cni.type == "bgp":
        pytest.skip("routes between nodes are the BGP speakers' (BIRD rescans the kernel table)")
    node = cluster.nodes["node1"]
    damage_then_repair(cluster, ["ip", "route", "del", PEER_CIDR],
                       check=lambda: PEER_CIDR in node.run(["ip", "route"]).stdout)


def test_deleted_vxlan_neighbour_and_fdb_come_back(cluster):
    if cluster.spec.cni.type != "vxlan":
        pytest.skip("VXLAN only")
    lease = cluster.mode.lease(cluster.nodes["node2"])
    node = cluster.nodes["node1"]
    damage_then_repair(cluster, ["ip", "neigh", "del", lease.vtep_ip, "dev", "flannel.1"],
                       ["bridge", "fdb", "del", lease.vtep_mac, "dev", "flannel.1", "dst", lease.public_ip],
                       check=lambda: lease.vtep_mac in node.run(["bridge", "fdb", "show", "dev", "flannel.1"]).stdout)


def test_deleted_bpf_map_entry_comes_back(cluster):
    if cluster.spec.cni.type != "ipip" or cluster.mode.datapath != "ebpf":
        pytest.skip("the eBPF IPIP datapath only")
    tc = cluster.mode._tc["node1"]
    # on one L2 segment the plain packet still arrives: the map entry is what is checked
    damage_then_repair(cluster, lambda: tc.del_tunnel(PEER_CIDR), breaks=False,
                       check=lambda: tc.tunnels().get(PEER_CIDR) == "192.168.1.130")


def test_detached_bpf_programs_come_back(cluster):
    if cluster.spec.cni.type != "ipip" or cluster.mode.datapath != "ebpf":
        pytest.skip("the eBPF IPIP datapath only")
    tc = cluster.mode._tc["node1"]
    damage_then_repair(cluster, ["tc", "filter", "del", "dev", "eth0", "egress"], check=tc.attached, breaks=False)


def test_deleted_pod_route_comes_back(cluster):
    """Felix's route refresh: the /32 of a local pod on its cali* veth."""
    if cluster.spec.cni.type not in ("ipip", "bgp"):
        pytest.skip("the Calico layout only")
    p2 = cluster.pods["p2"]
    node = cluster.nodes["node2"]
    damage_then_repair(cluster, ["ip", "route", "del", f"{p2.ip}/32"], on="node2",
                       check=lambda: f"{p2.ip} dev cali" in node.run(["ip", "route"]).stdout)


def test_stop_ends_the_resync_thread(cluster):
    thread = cluster.agent_resync._thread
    assert thread is not None and thread.is_alive()
