"""Bad ``cni.bgp`` input through ``k8snetlab up``: exit status 2, one line naming the file, the
key and the fix, and no cluster built (the harness of test_cli_errors: run as "not root", with
a guard that would exit 99 if a cluster were constructed)."""

from __future__ import annotations

import pytest
import yaml
from cli_harness import THREE_NODES, cli, cluster, one_error_line

TWO_RACKS = THREE_NODES.parent / "two_racks.yaml"


def bgp(**options):
    return cluster(cni={"type": "bgp", "bgp": options})


def racks(**options):
    d = yaml.safe_load(TWO_RACKS.read_text())
    d["cni"] = {"type": "bgp", "bgp": options}
    return d


CASES = {
    "unknown-speaker": (lambda: bgp(speaker="quagga"), ["cni.bgp.speaker", "'quagga'", "bird", "exabgp"]),
    "unknown-node-speaker": (lambda: bgp(speakers={"node2": "frr"}), ["cni.bgp.speakers.node2", "'frr'", "bird, exabgp"]),
    "reflector-not-a-node": (lambda: bgp(topology="route-reflector", reflectors=["node1", "spine1"]),
                             ["cni.bgp.reflectors", "'spine1' is not a node", "node1, node2, node3"]),
    "as-zero": (lambda: bgp(asNumber=0), ["cni.bgp.asNumber", "0", "1..4294967295"]),
    "as-too-large": (lambda: bgp(asNumber=4294967296), ["cni.bgp.asNumber", "4294967296", "1..4294967295"]),
    "peer-with-tor-flat": (lambda: bgp(peerWithToR=True), ["cni.bgp.peerWithToR", "flat", "remove peerWithToR"]),
    "routed-without-tor": (lambda: racks(), ["cni.bgp", "peerWithToR: true", "ipip or vxlan"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_up_refuses_bad_bgp_options(case, tmp_path):
    make, expected = CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(make(), sort_keys=False))
    line = one_error_line(cli("up", str(path)))
    assert str(path) in line, line
    assert "needs root" not in line, "the file is validated before the root check"
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"


def test_up_cni_bgp_override_on_a_routed_underlay():
    line = one_error_line(cli("up", str(TWO_RACKS), "--cni", "bgp"))
    assert "peerWithToR" in line


def test_bgp_status_needs_root():
    line = one_error_line(cli("bgp", "status"))
    assert "root" in line and "sudo" in line
