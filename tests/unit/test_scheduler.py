"""Where the scheduler puts a pod: nodeName, nodeSelector, then kube-scheduler's default
spreading (fewest pods of the same workload first, then fewest pods). The scheduler is pure:
these tests need no root and no Mininet."""
import pytest

from k8snetlab.errors import SpecError
from k8snetlab.manifests import PodSpec
from k8snetlab.scheduler import Scheduler


def _scheduler(pods_on: dict[str, list[str | None]], labels: dict[str, dict] | None = None) -> Scheduler:
    """Nodes (with labels) and pods already bound, each given as its owner (None: a bare Pod)."""
    labels = labels or {}
    s = Scheduler({n: labels.get(n, {}) for n in pods_on})
    for node, owners in pods_on.items():
        for i, owner in enumerate(owners):
            s.bind(f"{node}-p{i}", node, owner)
    return s


def test_a_workload_spreads_before_load_counts():
    # node1 is the least loaded node but already runs a frontend pod; the next frontend pod
    # goes to node3, which has none, although node3 runs more pods in all
    s = _scheduler({"node1": ["ReplicationController/frontend"],
                    "node2": [None, None, None],
                    "node3": [None, None]})
    assert s.place(PodSpec(name="frontend-1", owner="ReplicationController/frontend")) == "node3"


def test_three_replicas_land_on_three_nodes():
    s = _scheduler({"node1": [], "node2": [None], "node3": []})
    placed = [s.schedule(PodSpec(name=f"web-{i}", owner="Deployment/web")) for i in range(3)]
    assert sorted(placed) == ["node1", "node2", "node3"]


def test_bare_pods_go_to_the_least_loaded_node_first_listed_on_ties():
    s = _scheduler({"node1": [None], "node2": [], "node3": []})
    assert s.place(PodSpec(name="a")) == "node2"


def test_node_name_and_node_selector_win():
    s = _scheduler({"node1": [], "node2": [None] * 5}, labels={"node2": {"disk": "ssd"}})
    assert s.place(PodSpec(name="a", node_name="node2")) == "node2"
    assert s.place(PodSpec(name="b", node_selector={"disk": "ssd"})) == "node2"
    with pytest.raises(SpecError, match="nodeName 'node9' is not a node"):
        s.place(PodSpec(name="c", node_name="node9"))
    with pytest.raises(SpecError, match="no node matches nodeSelector"):
        s.place(PodSpec(name="d", node_selector={"disk": "nvme"}))


def test_unbinding_frees_the_place_and_a_removed_node_gets_nothing():
    s = _scheduler({"node1": [None, None], "node2": [None]})
    s.unbind("node1-p0")
    s.unbind("node1-p1")
    assert s.load("node1") == 0
    assert s.place(PodSpec(name="x")) == "node1"
    s.remove_node("node1")
    assert s.place(PodSpec(name="y")) == "node2"
    s.unbind("never-bound")     # harmless


def test_a_thousand_pods_spread_evenly_over_a_hundred_nodes():
    s = Scheduler({f"node{i}": {} for i in range(100)})
    for i in range(1000):
        s.schedule(PodSpec(name=f"web-{i}", owner="Deployment/web"))
    assert {s.load(f"node{i}") for i in range(100)} == {10}
