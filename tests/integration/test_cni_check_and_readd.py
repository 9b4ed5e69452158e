"""CNI CHECK verifies the routes of the result (issue 14 item 7) and a refused second ADD
followed by the runtime's DEL leaves nothing behind (item 11), for every plugin we ship."""

from __future__ import annotations

import os

import pytest

from helpers import require_root_and
from k8snetlab import naming, spec
from k8snetlab.cluster import Cluster
from k8snetlab.cni_protocol import CNIError

pytestmark = pytest.mark.integration

# bridge, flannel (host-gw: delegates to bridge), Calico-style (ipip, bgp), docker (bridge on docker0)
MODES = ["bridge", "host-gw", "ipip", "bgp", "docker"]


def two_nodes(cni: str) -> dict:
    return {"name": f"heal-cni-{cni}",
            "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
            "nodes": [{"name": "node1", "ip": "192.168.1.129"}, {"name": "node2", "ip": "192.168.1.130"}],
            "cni": {"type": cni}}


@pytest.fixture(scope="module", params=MODES)
def cluster(request):
    require_root_and("mnexec", "brctl", "tc", "clang", "bpftool", "bird")
    c = Cluster(spec.from_dict(two_nodes(request.param)))
    c.start()
    index, path = c.state.index, c.state.path
    yield c
    c.stop()
    assert_gone(index, path)


def assert_gone(index, path) -> None:
    """Nothing of this cluster is left (other clusters may run on the machine meanwhile)."""
    assert not path.exists(), f"state directory {path} is left"
    links = [n for n in os.listdir("/sys/class/net") if naming.cluster_index_of(n) == index]
    assert not links, f"interfaces left: {links}"


def sleeper(name: str, node: str = "node2") -> dict:
    return {"kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [{"name": "c", "command": ["sleep", "600"]}]}}


def test_check_fails_when_the_default_route_is_deleted(cluster):
    (pod,) = cluster.add_pod(sleeper("routes"))
    try:
        cluster.check_pod("routes")
        pod.run(["ip", "route", "del", "default"])
        with pytest.raises(CNIError, match="route 0.0.0.0/0"):
            cluster.check_pod("routes")
    finally:
        cluster.delete_pod("routes")


def test_failed_second_add_then_del_leaves_nothing(cluster):
    """What a container runtime does: ADD, ADD again (refused: the pod already has eth0),
    DEL in answer to the failure. The DEL must remove what the first ADD made."""
    node = cluster.nodes["node2"]
    def veths() -> set[str]:
        return {l.split(":")[1].strip().split("@")[0] for l in node.run(["ip", "-o", "link"]).stdout.splitlines()
                if l.split(":")[1].strip().startswith(("veth", "cali"))}
    before = veths()
    (pod,) = cluster.add_pod(sleeper("readd"))
    kubelet = cluster.kubelets["node2"]
    runtime, net = kubelet.runtime, kubelet.netconf
    rt = kubelet.runtime_conf(pod)
    ipam_dir = node.state_dir / "ipam" / net.name
    ip = pod.ip
    try:
        assert (ipam_dir / ip).exists()
        with pytest.raises(CNIError, match="already has an interface"):
            runtime.add(net, rt)
        runtime.delete(net, rt)
        assert not (ipam_dir / ip).exists(), "the first ADD's IP is still allocated"
        assert pod.run(["ip", "-o", "link", "show", naming.POD_IFNAME], check=False).returncode != 0, \
            "the pod still has eth0"
        assert veths() == before, "a host veth of the pod is left"
    finally:
        cluster.delete_pod("readd")
