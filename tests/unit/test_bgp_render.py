"""The configuration BIRD and ExaBGP are given, rendered without root; where the daemons are
installed they parse it (``bird -p``, ``exabgp validate``): the same dry run the mode does
before it starts them."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest
from bgp_specs import build, flat, two_racks

from k8snetlab.bgp import plan, render


def bird_conf(p: plan.BgpPlan, name: str, tmp_path) -> str:
    return render.bird_conf(p.speakers[name], str(tmp_path / "bird.log"))


def test_bird_node_announces_its_block_and_exports_to_the_kernel(tmp_path):
    p = build(flat(3, holdTime=9))
    conf = bird_conf(p, "node2", tmp_path)
    assert "router id 192.168.1.11;" in conf
    assert "route 10.244.1.0/24 blackhole;" in conf            # Calico's block, blackholed locally
    kernel = conf[conf.index("protocol kernel"):conf.index("template bgp")]
    assert "export all;" in kernel and "import none;" in kernel
    assert "hold time 9;" in conf and "keepalive time 3;" in conf
    assert 'export where proto = "pod_cidr";' in conf            # a node announces its own block only
    assert "protocol bgp Mesh_192_168_1_10 from k8s_peer" in conf
    assert "protocol bgp Mesh_192_168_1_12 from k8s_peer" in conf
    assert 'description "node1";' in conf
    assert "local 192.168.1.11 as 64512;" in conf and "neighbor 192.168.1.12 as 64512;" in conf
    # node2 is passive towards node1 (lower address connects), active towards node3
    mesh10 = conf[conf.index("Mesh_192_168_1_10"):conf.index("Mesh_192_168_1_12")]
    assert "passive on;" in mesh10 and "passive on;" not in conf[conf.index("Mesh_192_168_1_12"):]
    assert "rr client" not in conf


def test_bird_reflector(tmp_path):
    p = build(flat(4, topology="route-reflector", reflectors=["node1", "node2"]))
    conf = bird_conf(p, "node1", tmp_path)
    assert "export all;" in conf[conf.index("template bgp"):]   # reflects what it learns
    client = conf[conf.index("Node_192_168_1_12"):]
    assert "rr client;" in client and "rr cluster id 244.0.0.1;" in client
    other_rr = conf[conf.index("Node_192_168_1_11"):conf.index("Node_192_168_1_12")]
    assert "rr client" not in other_rr and "rr cluster id 244.0.0.1;" in other_rr
    assert "rr " not in bird_conf(p, "node4", tmp_path)


def test_bird_tor_sessions(tmp_path):
    p = build(two_racks())
    node = bird_conf(p, "node-a1", tmp_path)
    assert "protocol bgp ToR_10_100_0_1" in node
    assert "local 10.100.0.11 as 64512;" in node and "neighbor 10.100.0.1 as 65001;" in node
    assert "allow local as 1;" in node
    tor = bird_conf(p, "tor-a", tmp_path)
    assert "protocol static" not in tor                         # a router originates nothing
    assert "protocol bgp Fabric_10_100_255_2" in tor and "neighbor 10.100.255.2 as 65002;" in tor
    assert "local 10.100.0.1 as 65001;" in tor and "allow local as" not in tor


def test_exabgp_config(tmp_path):
    p = build(flat(3, speakers={"node3": "exabgp"}, holdTime=6))
    conf = render.exabgp_conf(p.speakers["node3"], "/usr/bin/python3 -m k8snetlab.bgp.installer")
    assert "run /usr/bin/python3 -m k8snetlab.bgp.installer;" in conf
    assert "encoder json;" in conf and "neighbor-changes;" in conf and "parsed;" in conf and "update;" in conf
    assert "route 10.244.2.0/24 next-hop self;" in conf
    assert "hold-time 6;" in conf and "router-id 192.168.1.12;" in conf
    for addr in ("192.168.1.10", "192.168.1.11"):
        block = conf[conf.index(f"neighbor {addr} {{"):]
        block = block[:block.index("}")]
        assert "local-address 192.168.1.12;" in block and "peer-as 64512;" in block
        assert "passive true;" in block          # node3 has the highest address: the others connect


def test_protocol_names_are_calicos():
    mk = lambda kind: plan.Peer("x", "10.0.0.1", "10.0.0.2", 1, 1, kind)
    assert [render.protocol_name(mk(k)) for k in (plan.MESH, plan.RR, plan.TOR, plan.FABRIC)] == \
        ["Mesh_10_0_0_1", "Node_10_0_0_1", "ToR_10_0_0_1", "Fabric_10_0_0_1"]


@pytest.mark.skipif(shutil.which("bird") is None and shutil.which("bird", path="/usr/sbin") is None,
                    reason="bird is not installed (apt-get install bird2)")
@pytest.mark.parametrize("case", ["mesh", "reflector", "client", "tor-node", "tor-router"])
def test_bird_parses_what_we_render(case, tmp_path):
    p = {"mesh": lambda: build(flat(5)), "reflector": lambda: build(flat(5, topology="route-reflector",
                                                                         reflectors=["node1", "node2"])),
         "client": lambda: build(flat(5, topology="route-reflector", reflectors=["node1", "node2"])),
         "tor-node": lambda: build(two_racks()), "tor-router": lambda: build(two_racks())}[case]()
    name = {"mesh": "node3", "reflector": "node1", "client": "node5", "tor-node": "node-b1", "tor-router": "tor-b"}[case]
    path = tmp_path / "bird.conf"
    path.write_text(bird_conf(p, name, tmp_path))
    bird = shutil.which("bird") or shutil.which("bird", path="/usr/sbin")
    r = subprocess.run([bird, "-p", "-c", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(importlib.util.find_spec("exabgp") is None, reason="exabgp is not installed (pip install exabgp)")
def test_exabgp_parses_what_we_render(tmp_path):
    p = build(two_racks(speakers={"node-a2": "exabgp"}))
    path = tmp_path / "exabgp.conf"
    path.write_text(render.exabgp_conf(p.speakers["node-a2"], f"{sys.executable} -m k8snetlab.bgp.installer"))
    r = subprocess.run([sys.executable, "-m", "exabgp", "validate", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
