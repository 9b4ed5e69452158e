"""A leaf-spine fabric whose size is a parameter: N leaves (top-of-rack routers) with K nodes
each, every leaf linked to every spine.

    sudo k8snetlab up topologies/leaf_spine.py --param leaves=4 --param nodes_per_leaf=3
    sudo python experiments/cni_modes.py --topology topologies/leaf_spine.py --param leaves=3

This file is a topology *generator*: ``k8snetlab.spec.load`` calls ``cluster(**params)`` and
validates what it returns exactly like a YAML cluster file (see topologies/two_racks.yaml
for the same keys written out). Address plan:

    rack of leaf i (i = 1..N)      10.100.<i-1>.0/24, gateway (the leaf) .1, nodes .11, .12, ...
    link leaf i - spine j          10.101.<i-1>.<4(j-1)>/30: the leaf .+1, the spine .+2
    pods                           10.244.0.0/16, a /24 per node
    services                       10.96.0.0/16 (not /12: that would cover 10.100-10.101)

Every leaf and spine is a router (a host with forwarding on); the runtime gives each router
static routes to every subnet along every shortest path: with two spines a leaf has one ECMP
route with a next hop per spine, hashed on the 5-tuple (``fib_multipath_hash_policy=1``), so
VXLAN flows (a UDP source port each) spread over the spines while IPIP between two nodes
always takes one. Nodes are labelled ``rack=<leaf>`` and their default
route points at their leaf. No node is L2-adjacent to a node of another leaf, so host-gw is
refused here; vxlan (the default) and ipip work, ipip with ``ipipMode: CrossSubnet``
encapsulating only between racks.
"""

from __future__ import annotations

from typing import Any

from k8snetlab.errors import SpecError

MAX_NODES = 256          # a /24 pod CIDR per node in 10.244.0.0/16


def _check(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise SpecError(f"parameter {name}: {value} is out of range {lo}..{hi}")


def cluster(leaves: int = 2, nodes_per_leaf: int = 2, spines: int = 2) -> dict[str, Any]:
    _check("leaves", leaves, 1, 250)
    _check("nodes_per_leaf", nodes_per_leaf, 1, 240)
    _check("spines", spines, 1, 64)
    if leaves * nodes_per_leaf > MAX_NODES:
        raise SpecError(f"parameters leaves x nodes_per_leaf: {leaves * nodes_per_leaf} nodes, "
                        f"but the pod network has room for {MAX_NODES}: make the fabric smaller")
    subnets: list[dict[str, Any]] = []
    routers: list[dict[str, Any]] = []
    nodes: list[dict[str, Any]] = []
    spine_itfs: dict[int, list[dict[str, str]]] = {j: [] for j in range(1, spines + 1)}
    for i in range(1, leaves + 1):
        leaf, rack = f"leaf{i}", f"rack{i}"
        subnets.append({"name": rack, "cidr": f"10.100.{i - 1}.0/24", "gateway": f"10.100.{i - 1}.1"})
        itfs = [{"subnet": rack, "ip": f"10.100.{i - 1}.1"}]
        for j in range(1, spines + 1):
            link, base = f"leaf{i}-spine{j}", 4 * (j - 1)
            subnets.append({"name": link, "cidr": f"10.101.{i - 1}.{base}/30"})
            itfs.append({"subnet": link, "ip": f"10.101.{i - 1}.{base + 1}"})
            spine_itfs[j].append({"subnet": link, "ip": f"10.101.{i - 1}.{base + 2}"})
        routers.append({"name": leaf, "interfaces": itfs})
        for k in range(1, nodes_per_leaf + 1):
            nodes.append({"name": f"{leaf}-node{k}", "ip": f"10.100.{i - 1}.{10 + k}",
                          "labels": {"rack": leaf}})
    routers += [{"name": f"spine{j}", "interfaces": spine_itfs[j]} for j in range(1, spines + 1)]
    return {
        "name": f"leaf-spine-{leaves}x{nodes_per_leaf}-s{spines}",
        "underlay": {"subnets": subnets, "routers": routers},
        "nodes": nodes,
        "network": {"clusterCIDR": "10.244.0.0/16", "nodeCIDRMaskSize": 24, "serviceCIDR": "10.96.0.0/16"},
        "cni": {"type": "vxlan", "ipip": {"datapath": "auto", "ipipMode": "CrossSubnet"}},
        "workloads": [_web(len(nodes))],
    }


def _web(replicas: int) -> dict[str, Any]:
    """Deployment web: one pod per node (the scheduler spreads over the least loaded nodes)."""
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{
                    "name": "web", "image": "python:3-slim",
                    "command": ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"],
                    "ports": [{"name": "http", "containerPort": 8080}]}]},
            },
        },
    }
