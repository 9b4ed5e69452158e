"""The node agents' periodic reconcile, without root: the period is each mode's option
(flannel's RouteCheckInterval, Calico's routeRefreshInterval), checked when the cluster file
loads; a round re-runs ``add_peer`` only for the peers whose state is gone; stop() ends it."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from k8snetlab import spec
from k8snetlab.errors import SpecError
from k8snetlab.modes import MODES, resync

REPO = Path(__file__).resolve().parents[2]
THREE_NODES = REPO / "topologies" / "three_nodes.yaml"


class StateNs:
    """A namespace with routes only: what add_route adds, routes() and route_dsts() show."""

    def __init__(self, routes=()):
        self.table = {dst: {"dst": dst, "gateway": None, "dev": "eth0"} for dst in routes}
        self.added: list[str] = []

    def routes(self):
        return list(self.table.values())

    def route_dsts(self):
        return set(self.table)

    def add_route(self, dst, gateway=None, dev=None, **kw):
        self.table[dst] = {"dst": dst, "gateway": gateway, "dev": dev}
        self.added.append(dst)

    def replace_routes(self, routes):
        for r in routes:
            self.add_route(r["dst"], gateway=r.get("gateway"), dev=r.get("dev"))

    def require_index(self, ifname):
        return 2

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def load(cni: str, options: dict | None = None):
    data = {"name": "t", "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24"}]},
            "nodes": [{"name": f"node{i}", "ip": f"192.168.1.{128 + i}"} for i in (1, 2, 3)],
            "cni": {"type": cni, **({cni: options} if options is not None else {})}}
    return spec.from_dict(data, "f.yaml")


@pytest.mark.parametrize("cni,key,default", [("host-gw", "RouteCheckInterval", 10.0),
                                             ("vxlan", "RouteCheckInterval", 10.0),
                                             ("ipip", "routeRefreshInterval", 90.0),
                                             ("bgp", "routeRefreshInterval", 90.0)])
def test_period_is_a_mode_option_checked_at_load(cni, key, default):
    s = load(cni)
    mode = MODES.get(cni)(SimpleNamespace(spec=s), s.cni.options)
    assert mode.resync_period == default
    s = load(cni, {key: 2.5})
    assert MODES.get(cni)(SimpleNamespace(spec=s), s.cni.options).resync_period == 2.5
    for bad in (0, -1, "often", 10 ** 6):
        with pytest.raises(SpecError, match=key):
            load(cni, {key: bad})


@pytest.mark.parametrize("cni", ["bridge", "docker"])
def test_modes_without_peers_have_no_resync(cni):
    s = load(cni)
    assert MODES.get(cni)(SimpleNamespace(spec=s), s.cni.options).resync_period is None


def nodes_of(s):
    return {n.name: SimpleNamespace(name=n.name, spec=n, pid=i, netns=f"/nonexistent/{n.name}") for i, n in enumerate(s.nodes, 1)}


def test_a_round_repairs_only_what_is_gone():
    s = load("host-gw")
    nodes = nodes_of(s)
    mode = MODES.get("host-gw")(SimpleNamespace(spec=s), s.cni.options)
    ns = StateNs(routes=[str(nodes["node2"].spec.pod_cidr)])          # node3's route was deleted
    fixed = mode.resync_node(nodes["node1"], ns, [nodes["node2"], nodes["node3"]])
    assert fixed == ["node3"] and ns.added == [str(nodes["node3"].spec.pod_cidr)]
    assert mode.resync_node(nodes["node1"], ns, [nodes["node2"], nodes["node3"]]) == []


def test_agent_resync_rounds_and_stop(monkeypatch):
    s = load("host-gw", {"RouteCheckInterval": 0.1})
    nodes = nodes_of(s)
    mode = MODES.get("host-gw")(SimpleNamespace(spec=s), s.cni.options)
    spaces = {name: StateNs() for name in nodes}
    monkeypatch.setattr(resync, "Netns", lambda path, label: spaces[label])
    agent = resync.AgentResync(mode, lambda: nodes, mode.resync_period, threading.RLock())
    assert agent.resync_once() == {"node1": ["node2", "node3"], "node2": ["node1", "node3"],
                                   "node3": ["node1", "node2"]}
    assert agent.resync_once() == {} and agent.rounds == 2
    del spaces["node2"].table[str(nodes["node1"].spec.pod_cidr)]
    agent.start()
    try:
        want, waited = agent.rounds + 2, 0
        while agent.rounds < want and waited < 500:      # bounded: 10 s
            threading.Event().wait(0.02)
            waited += 1
        assert str(nodes["node1"].spec.pod_cidr) in spaces["node2"].table
    finally:
        agent.stop()
    assert agent._thread is None
