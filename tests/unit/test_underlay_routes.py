"""Static routes of a routed underlay: every shortest path, so two spines give two first hops
(one ECMP route) and a chain of routers gives one."""
from pathlib import Path

from k8snetlab import spec
from k8snetlab.cluster import underlay_first_hops

REPO = Path(__file__).resolve().parents[2]


def graph(path, **params):
    s = spec.load(path, params=params) if params else spec.load(path)
    on = {r.name: [n for n, _ in r.interfaces] for r in s.underlay.routers}
    addr = {(r.name, n): str(ip) for r in s.underlay.routers for n, ip in r.interfaces}
    return s, on, addr


def test_two_spines_give_two_equal_first_hops():
    s, on, addr = graph(REPO / "topologies" / "leaf_spine.py", leaves=3, nodes_per_leaf=1, spines=2)
    hops = underlay_first_hops("leaf1", on, addr)
    spine_addrs = sorted([addr[("spine1", "leaf1-spine1")], addr[("spine2", "leaf1-spine2")]])
    assert hops["rack2"] == hops["rack3"] == spine_addrs            # ECMP over both spines
    assert hops["leaf2-spine1"] == [addr[("spine1", "leaf1-spine1")]]  # one hop away: one path
    assert set(hops) == {n.name for n in s.underlay.subnets} - set(on["leaf1"])
    # a spine reaches each rack through that rack's leaf only
    assert underlay_first_hops("spine1", on, addr)["rack2"] == [addr[("leaf2", "leaf2-spine1")]]


def test_a_chain_of_routers_has_one_path():
    on = {"r1": ["a", "ab"], "r2": ["ab", "bc"], "r3": ["bc", "c"]}
    addr = {("r1", "a"): "10.0.0.1", ("r1", "ab"): "10.0.1.1", ("r2", "ab"): "10.0.1.2",
            ("r2", "bc"): "10.0.2.2", ("r3", "bc"): "10.0.2.3", ("r3", "c"): "10.0.3.3"}
    assert underlay_first_hops("r1", on, addr) == {"bc": ["10.0.1.2"], "c": ["10.0.1.2"]}
    assert underlay_first_hops("r2", on, addr) == {"a": ["10.0.1.1"], "c": ["10.0.2.3"]}
