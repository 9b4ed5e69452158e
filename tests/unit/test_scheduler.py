"""Where Cluster.schedule puts a pod: nodeName, nodeSelector, then kube-scheduler's default
spreading (fewest pods of the same workload first, then fewest pods)."""
from types import SimpleNamespace

import pytest

from k8snetlab.cluster import Cluster
from k8snetlab.errors import SpecError
from k8snetlab.manifests import PodSpec


def _cluster(pods_on: dict[str, list[str | None]], labels: dict[str, dict] | None = None):
    """A stand-in holding only what schedule() reads: nodes (with labels) and placed pods,
    each given as its owner (None for a bare Pod)."""
    labels = labels or {}
    nodes = {n: SimpleNamespace(spec=SimpleNamespace(labels=labels.get(n, {}))) for n in pods_on}
    pods = {}
    for node, owners in pods_on.items():
        for i, owner in enumerate(owners):
            name = f"{node}-p{i}"
            pods[name] = SimpleNamespace(node_name=node, spec=PodSpec(name=name, owner=owner))
    return SimpleNamespace(nodes=nodes, pods=pods)


def test_a_workload_spreads_before_load_counts():
    # node1 is the least loaded node but already runs a frontend pod; the next frontend pod
    # goes to node3, which has none, although node3 runs more pods in all
    c = _cluster({"node1": ["ReplicationController/frontend"],
                  "node2": [None, None, None],
                  "node3": [None, None]})
    pod = PodSpec(name="frontend-1", owner="ReplicationController/frontend")
    assert Cluster.schedule(c, pod) == "node3"


def test_three_replicas_land_on_three_nodes():
    c = _cluster({"node1": [], "node2": [None], "node3": []})
    owner = "Deployment/web"
    placed = []
    for i in range(3):
        node = Cluster.schedule(c, PodSpec(name=f"web-{i}", owner=owner))
        c.pods[f"web-{i}"] = SimpleNamespace(node_name=node, spec=PodSpec(name=f"web-{i}", owner=owner))
        placed.append(node)
    assert sorted(placed) == ["node1", "node2", "node3"]


def test_bare_pods_go_to_the_least_loaded_node_first_listed_on_ties():
    c = _cluster({"node1": [None], "node2": [], "node3": []})
    assert Cluster.schedule(c, PodSpec(name="a")) == "node2"


def test_node_name_and_node_selector_win():
    c = _cluster({"node1": [], "node2": [None] * 5}, labels={"node2": {"disk": "ssd"}})
    assert Cluster.schedule(c, PodSpec(name="a", node_name="node2")) == "node2"
    assert Cluster.schedule(c, PodSpec(name="b", node_selector={"disk": "ssd"})) == "node2"
    with pytest.raises(SpecError, match="nodeName 'node9' is not a node"):
        Cluster.schedule(c, PodSpec(name="c", node_name="node9"))
    with pytest.raises(SpecError, match="no node matches nodeSelector"):
        Cluster.schedule(c, PodSpec(name="d", node_selector={"disk": "nvme"}))
