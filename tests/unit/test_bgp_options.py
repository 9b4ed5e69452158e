"""``cni.bgp`` options: what a cluster file may say, and one clear line for what it may not,
at load time (before anything is built)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from k8snetlab import spec
from k8snetlab.errors import SpecError
from k8snetlab.modes.bgp import BgpOptions

REPO = Path(__file__).resolve().parents[2]
THREE_NODES = REPO / "topologies" / "three_nodes.yaml"
TWO_RACKS = REPO / "topologies" / "two_racks.yaml"


def load(base: Path, **bgp: Any) -> spec.ClusterSpec:
    d = yaml.safe_load(base.read_text())
    d["cni"] = {"type": "bgp", "bgp": bgp}
    return spec.from_dict(d, str(base.name))


def error(base: Path, **bgp: Any) -> str:
    with pytest.raises(SpecError) as e:
        load(base, **bgp)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_calicos():
    o = load(THREE_NODES).cni.options
    assert isinstance(o, BgpOptions)
    assert (o.as_number, o.topology, o.speaker, o.peer_with_tor) == (64512, "mesh", "bird", False)
    assert o.reflectors == [] and o.speakers == {} and o.tor_as_numbers == {}


def test_valid_variants_load():
    o = load(THREE_NODES, asNumber=4294967295, topology="route-reflector", reflectors=["node1", "node2"],
             speakers={"node3": "exabgp"}, holdTime=3).cni.options
    assert o.as_number == 4294967295 and o.reflectors == ["node1", "node2"] and o.hold_time == 3
    o = load(TWO_RACKS, peerWithToR=True, torASNumbers={"tor-a": 65010}, speaker="exabgp").cni.options
    assert o.peer_with_tor and o.tor_as_numbers == {"tor-a": 65010}


def test_pod_mtu_is_1500_no_encapsulation():
    from k8snetlab.modes import MODES
    assert MODES.get("bgp").pod_mtu == 1500


@pytest.mark.parametrize("asn", [0, 4294967296, -1])
def test_as_number_out_of_range(asn):
    msg = error(THREE_NODES, asNumber=asn)
    assert "three_nodes.yaml" in msg and "cni.bgp.asNumber" in msg and "1..4294967295" in msg


def test_as_number_not_a_number():
    assert "cni.bgp.asNumber" in error(THREE_NODES, asNumber="64512")


def test_unknown_speaker_lists_the_valid_ones():
    msg = error(THREE_NODES, speaker="frr")
    assert "cni.bgp.speaker" in msg and "'frr'" in msg and "bird" in msg and "exabgp" in msg
    msg = error(THREE_NODES, speakers={"node3": "gobgp"})
    assert "cni.bgp.speakers.node3" in msg and "'gobgp'" in msg and "bird, exabgp" in msg


def test_speaker_override_for_a_node_that_does_not_exist():
    msg = error(THREE_NODES, speakers={"node9": "exabgp"})
    assert "'node9' is not a node" in msg and "node1" in msg


def test_reflector_that_is_not_a_node():
    msg = error(THREE_NODES, topology="route-reflector", reflectors=["node1", "rr9"])
    assert "cni.bgp.reflectors" in msg and "'rr9' is not a node" in msg and "node1, node2, node3" in msg


def test_route_reflector_needs_reflectors():
    assert "at least one reflector" in error(THREE_NODES, topology="route-reflector")


def test_reflectors_without_route_reflector_topology():
    assert "topology: route-reflector" in error(THREE_NODES, reflectors=["node1"])


def test_reflector_listed_twice():
    assert "listed twice" in error(THREE_NODES, topology="route-reflector", reflectors=["node1", "node1"])


def test_exabgp_cannot_reflect():
    msg = error(THREE_NODES, topology="route-reflector", reflectors=["node1"], speakers={"node1": "exabgp"})
    assert "node1 runs exabgp" in msg and "bird" in msg


def test_unknown_topology():
    msg = error(THREE_NODES, topology="star")
    assert "cni.bgp.topology" in msg and "mesh" in msg and "route-reflector" in msg


def test_hold_time_below_birds_minimum():
    assert "cni.bgp.holdTime" in error(THREE_NODES, holdTime=2)


def test_peer_with_tor_on_a_flat_underlay():
    msg = error(THREE_NODES, peerWithToR=True)
    assert "cni.bgp.peerWithToR" in msg and "flat" in msg and "remove peerWithToR" in msg


def test_routed_underlay_without_peer_with_tor():
    msg = error(TWO_RACKS)
    assert "peerWithToR" in msg and ("ipip" in msg or "vxlan" in msg)
    assert "node-a1" in msg and "node-b1" in msg


def test_peer_with_tor_replaces_the_mesh():
    assert "replaces the node-to-node sessions" in error(TWO_RACKS, peerWithToR=True, topology="route-reflector",
                                                          reflectors=["node-a1"])


def test_tor_as_numbers_checked():
    assert "'spine' is not an underlay router" in error(TWO_RACKS, peerWithToR=True, torASNumbers={"spine": 65001})
    assert "out of range" in error(TWO_RACKS, peerWithToR=True, torASNumbers={"tor-a": 0})
    assert "eBGP" in error(TWO_RACKS, peerWithToR=True, torASNumbers={"tor-a": 64512})
    assert "only used with peerWithToR" in error(THREE_NODES, torASNumbers={"tor-a": 65001})


def test_unknown_option():
    msg = error(THREE_NODES, nodeToNodeMesh=True)
    assert "unknown option 'nodeToNodeMesh'" in msg and "asNumber" in msg
