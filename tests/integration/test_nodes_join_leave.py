"""host-gw and ipip keep every node's routes in sync when nodes join or leave, with the
plugins called in-process (``cni.invoke: inprocess``) as large clusters do."""

from __future__ import annotations

import pytest

from helpers import THREE_NODES, require_root_and
from leftover_check import running
from k8snetlab import spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["host-gw", "ipip"])
def test_routes_follow_nodes_joining_and_leaving(mode):
    require_root_and("mnexec", "brctl", "tc", "clang", "bpftool")
    s = spec.with_cni(spec.load(THREE_NODES), mode, invoke="inprocess")
    with running(Cluster(s)) as c:
        node4 = c.add_node("node4", "192.168.1.132")
        cidr = str(node4.spec.pod_cidr)
        assert cidr == "10.244.3.0/24"
        for other in ("node1", "node2", "node3"):
            assert cidr in c.nodes[other].run(["ip", "route"]).stdout, f"{other} has no route to node4's pods"
        (pod,) = c.add_pod({"kind": "Pod", "metadata": {"name": "on-node4"},
                            "spec": {"nodeName": "node4", "containers": [{"name": "c", "command": []}]}})
        assert pod.ip.startswith("10.244.3.")
        src = c.pods["web-0"]
        assert src.run(["ping", "-c", "1", "-W", "2", pod.ip], check=False).returncode == 0
        assert pod.run(["ping", "-c", "1", "-W", "2", src.ip], check=False).returncode == 0
        c.remove_node("node4")
        assert "on-node4" not in c.pods and "node4" not in c.nodes
        for other in ("node1", "node2", "node3"):
            assert cidr not in c.nodes[other].run(["ip", "route"]).stdout
        assert src.run(["ping", "-c", "1", "-W", "2", c.pods["web-1"].ip], check=False).returncode == 0
        # a node joining after one left gets a fresh underlay port and works
        node5 = c.add_node("node5", "192.168.1.133")
        assert src.run(["ping", "-c", "1", "-W", "2", node5.ip], check=False).returncode == 0
        assert str(node5.spec.pod_cidr) in c.nodes["node1"].run(["ip", "route"]).stdout
        # the name and address of a node that left are free again
        again = c.add_node("node4", "192.168.1.132")
        assert src.run(["ping", "-c", "1", "-W", "2", again.ip], check=False).returncode == 0
