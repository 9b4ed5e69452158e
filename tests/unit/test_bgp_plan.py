"""Who peers with whom in the bgp mode: session counts match the formulas operators use to size
a Calico cluster, reflectors and ToR routers get the sessions Calico would give them."""

from __future__ import annotations

import pytest

from bgp_specs import build, flat, two_racks

from k8snetlab.bgp import plan

@pytest.mark.parametrize("n", [2, 3, 10, 50, 100])
def test_mesh_has_n_n_minus_1_over_2_sessions(n):
    p = build(flat(n))
    assert len(p.sessions()) == n * (n - 1) // 2 == plan.mesh_sessions(n)
    assert all(len(s.peers) == n - 1 for s in p.speakers.values())
    assert all(pe.kind == plan.MESH and not pe.ebgp for s in p.speakers.values() for pe in s.peers)


@pytest.mark.parametrize("n,r", [(3, 1), (10, 2), (50, 2), (100, 2), (20, 3)])
def test_route_reflectors_session_formula(n, r):
    rrs = [f"node{i + 1}" for i in range(r)]
    p = build(flat(n, topology="route-reflector", reflectors=rrs))
    assert len(p.sessions()) == plan.rr_sessions(n, r) == (n - r) * r + r * (r - 1) // 2
    for s in p.speakers.values():
        if s.name in rrs:
            assert s.role == plan.REFLECTOR and s.rr_cluster_id == plan.RR_CLUSTER_ID
            assert len(s.peers) == n - 1                        # every client and the other reflectors
            assert {pe.name for pe in s.peers if not pe.rr_client} == set(rrs) - {s.name}
        else:
            assert s.role == plan.NODE and s.rr_cluster_id is None
            assert {pe.name for pe in s.peers} == set(rrs)       # clients peer with reflectors only
            assert not any(pe.rr_client for pe in s.peers)


def test_fifty_nodes_two_reflectors_is_under_a_tenth_of_the_mesh():
    assert plan.rr_sessions(50, 2) / plan.mesh_sessions(50) <= 0.1


def test_one_side_of_every_session_connects():
    """Exactly one side opens the TCP connection: the lower address (no collisions)."""
    p = build(flat(6))
    for s in p.speakers.values():
        for pe in s.peers:
            back = next(x for x in p.speakers[pe.name].peers if x.name == s.name)
            assert pe.passive != back.passive
            assert pe.passive == (plan.ip_key(pe.local_address) > plan.ip_key(pe.address))


def test_announces_own_pod_cidr_and_keepalive_is_a_third_of_hold():
    s = flat(3, holdTime=9)
    p = build(s)
    for n in s.nodes:
        sp = p.speakers[n.name]
        assert sp.announce == (str(n.pod_cidr),)
        assert sp.router_id == str(n.ip) and sp.asn == 64512
        assert (sp.hold_time, sp.keepalive) == (9, 3)
    assert build(flat(2, holdTime=3)).speakers["node1"].keepalive == 1


def test_per_node_speaker_override():
    p = build(flat(3, speakers={"node3": "exabgp"}))
    assert [p.speakers[f"node{i}"].speaker for i in (1, 2, 3)] == ["bird", "bird", "exabgp"]


def test_plan_of_the_running_nodes_only():
    p = plan.build(flat(4), flat(4).cni.options, node_names=["node1", "node2", "node4"])
    assert set(p.speakers) == {"node1", "node2", "node4"}
    assert len(p.sessions()) == 3


def test_tor_nodes_peer_by_ebgp_with_their_gateway_router():
    s = two_racks()
    p = build(s)
    assert p.topology == "tor"
    routers = {r.name: r for r in p.routers()}
    assert (routers["tor-a"].asn, routers["tor-b"].asn) == (65001, 65002)
    for n in s.nodes:
        (peer,) = p.speakers[n.name].peers
        assert peer.name == ("tor-a" if n.subnet == "rack-a" else "tor-b")
        assert peer.address == str(s.underlay.subnet(n.subnet).gateway)
        assert peer.ebgp and peer.local_as == 64512 and peer.kind == plan.TOR
        assert peer.allow_local_as      # the path back holds 64512 (node -> ToR -> ToR -> node)
    a = routers["tor-a"]
    assert {pe.name for pe in a.peers} == {"node-a1", "node-a2", "tor-b"}
    core = next(pe for pe in a.peers if pe.name == "tor-b")
    assert (core.address, core.local_address, core.peer_as, core.kind) == ("10.100.255.2", "10.100.255.1", 65002, plan.FABRIC)
    assert a.exports_learned and not p.speakers["node-a1"].exports_learned
    assert a.announce == ()
    assert len(p.sessions()) == 4 + 1


def test_tor_as_numbers_are_configurable():
    p = build(two_racks(torASNumbers={"tor-b": 65100}))
    assert {r.name: r.asn for r in p.routers()} == {"tor-a": 65001, "tor-b": 65100}
    assert plan.tor_as_numbers(two_racks(), {"tor-a": 65002}) == {"tor-a": 65002, "tor-b": 65001}


def test_a_mesh_whose_arp_entries_overflow_the_kernels_neighbour_table_is_refused(monkeypatch):
    """200 nodes in a mesh need 39,800 ARP entries; the machine's table held 16,384: the
    speakers flapped and spun for a quarter of an hour. Refused with the fix; the same nodes
    with two reflectors, or 100 in a mesh, are fine."""
    from k8snetlab.errors import SpecError
    monkeypatch.setattr(plan, "neighbour_limit", lambda: 16384)
    with pytest.raises(SpecError, match=r"39,800 ARP entries.*16,384.*gc_thresh3.*route-reflector"):
        flat(200)
    assert flat(200, topology="route-reflector", reflectors=["node1", "node2"]).cni.options.reflectors
    assert len(flat(100).nodes) == 100
    monkeypatch.setattr(plan, "neighbour_limit", lambda: None)     # unknown: not refused
    assert len(flat(200).nodes) == 200


def test_neighbour_limit_reads_the_kernels_gc_thresh3(monkeypatch, tmp_path):
    f = tmp_path / "gc_thresh3"
    f.write_text("16384\n")
    monkeypatch.setattr(plan, "NEIGH_LIMIT_SYSCTL", str(f))
    assert plan.neighbour_limit() == 16384 and plan.neighbour_entries(plan.mesh_sessions(200)) == 39800
    monkeypatch.setattr(plan, "NEIGH_LIMIT_SYSCTL", str(tmp_path / "absent"))
    assert plan.neighbour_limit() is None
