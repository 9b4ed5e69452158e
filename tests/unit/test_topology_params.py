"""Python topology files and their parameters: ``spec.load(path, params=...)``, the
``leaf_spine`` generator, and ``--param`` on the command line (``k8snetlab up`` and the
experiments), each bad input refused in one line before anything is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from k8snetlab import spec
from k8snetlab.errors import SpecError

REPO = Path(__file__).resolve().parents[2]
LEAF_SPINE = REPO / "topologies" / "leaf_spine.py"
TWO_RACKS = REPO / "topologies" / "two_racks.yaml"
CNI_MODES = REPO / "experiments" / "cni_modes.py"


# ------------------------------------------------------------------------------ leaf_spine

def test_leaf_spine_defaults_two_leaves_of_two_nodes_and_two_spines():
    s = spec.load(LEAF_SPINE)
    assert [n.name for n in s.nodes] == ["leaf1-node1", "leaf1-node2", "leaf2-node1", "leaf2-node2"]
    routers = {r.name: dict(r.interfaces) for r in s.underlay.routers}
    assert sorted(routers) == ["leaf1", "leaf2", "spine1", "spine2"]
    # a leaf: its rack (as the nodes' gateway) and a /30 to every spine
    assert set(routers["leaf1"]) == {"rack1", "leaf1-spine1", "leaf1-spine2"}
    assert set(routers["spine2"]) == {"leaf1-spine2", "leaf2-spine2"}
    subnets = {x.name: x for x in s.underlay.subnets}
    assert str(subnets["rack2"].cidr) == "10.100.1.0/24" and str(subnets["rack2"].gateway) == "10.100.1.1"
    assert all(subnets[f"leaf{i}-spine{j}"].cidr.prefixlen == 30 for i in (1, 2) for j in (1, 2))
    assert str(routers["leaf2"]["leaf2-spine1"]) == "10.101.1.1" and str(routers["spine1"]["leaf2-spine1"]) == "10.101.1.2"
    assert {n.name: n.labels["rack"] for n in s.nodes} == {
        "leaf1-node1": "leaf1", "leaf1-node2": "leaf1", "leaf2-node1": "leaf2", "leaf2-node2": "leaf2"}
    assert {n.subnet for n in s.nodes} == {"rack1", "rack2"}
    pods = s.pods()
    assert len(pods) == len(s.nodes) and {p.name for p in pods} == {f"web-{i}" for i in range(4)}
    assert s.name == "leaf-spine-2x2-s2"


def test_leaf_spine_sizes_are_parameters():
    s = spec.load(LEAF_SPINE, params={"leaves": 4, "nodes_per_leaf": 3, "spines": 3})
    assert len(s.nodes) == 12 and len(s.pods()) == 12
    assert len([r for r in s.underlay.routers if r.name.startswith("spine")]) == 3
    assert len(s.underlay.subnets) == 4 + 4 * 3
    assert len({n.pod_cidr for n in s.nodes}) == 12
    assert s.name == "leaf-spine-4x3-s3"


def test_leaf_spine_with_another_cni():
    assert spec.load(LEAF_SPINE, cni="ipip", params={"leaves": 3}).cni.options.ipip_mode == "CrossSubnet"


@pytest.mark.parametrize("params, words", [
    ({"leaf": 3}, ["unknown parameter 'leaf'", "leaves (default 2)", "nodes_per_leaf (default 2)",
                   "spines (default 2)"]),
    ({"leaves": "four"}, ["parameter leaves", "expected int", "'four'"]),
    ({"leaves": True}, ["parameter leaves", "expected int"]),
    ({"leaves": 0}, ["parameter leaves", "out of range 1..250"]),
    ({"spines": 65}, ["parameter spines", "out of range 1..64"]),
    ({"leaves": 100, "nodes_per_leaf": 10}, ["1000 nodes", "room for 256"]),
])
def test_bad_parameters_are_one_line_naming_the_file(params, words):
    with pytest.raises(SpecError) as e:
        spec.load(LEAF_SPINE, params=params)
    line = str(e.value)
    assert "\n" not in line and line.startswith(str(LEAF_SPINE))
    for w in words:
        assert w in line, (w, line)


def test_host_gw_is_refused_on_leaf_spine():
    with pytest.raises(SpecError, match="host-gw needs every node on one L2 segment.*leaf1-node1.*leaf2-node1.*vxlan"):
        spec.load(LEAF_SPINE, cni="host-gw")


# ------------------------------------------------------------------------------ any generator

def write(tmp_path: Path, body: str, name: str = "topo.py") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


FLAT = """
def cluster(nodes: int = 2, name: str = "gen"):
    return {"name": name, "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.9.0/24"}]},
            "nodes": [{"name": f"n{i}", "ip": f"192.168.9.{10 + i}"} for i in range(1, nodes + 1)],
            "cni": {"type": "vxlan"}}
"""


def test_a_generator_returns_what_a_yaml_file_holds(tmp_path):
    path = write(tmp_path, FLAT)
    s = spec.load(path, params={"nodes": 3, "name": "three"})
    assert s.name == "three" and [n.name for n in s.nodes] == ["n1", "n2", "n3"] and s.source == str(path)
    assert len(spec.load(path).nodes) == 2


def test_what_the_generator_returns_is_validated_like_a_file(tmp_path):
    path = write(tmp_path, FLAT.replace("192.168.9.{10 + i}", "10.244.0.{10 + i}"))
    with pytest.raises(SpecError, match="is in none of the underlay subnets"):
        spec.load(path)


@pytest.mark.parametrize("body, words", [
    ("x = 1\n", ["defines def cluster(**params) -> dict", "has none"]),
    ("def cluster():\n    return [1]\n", ["must return a dict", "not list"]),
    ("def cluster():\n    raise ValueError('no room')\n", ["cluster() failed", "ValueError: no room"]),
    ("def cluster(:\n", ["loading the topology generator failed", "SyntaxError"]),
    ("import k8snetlab_no_such_module\n", ["loading the topology generator failed", "ModuleNotFoundError"]),
])
def test_broken_generators_are_one_line(tmp_path, body, words):
    path = write(tmp_path, body)
    with pytest.raises(SpecError) as e:
        spec.load(path)
    line = str(e.value)
    assert "\n" not in line and line.startswith(str(path))
    for w in words:
        assert w in line, (w, line)


def test_a_generator_may_define_dataclasses(tmp_path):
    body = ("from dataclasses import dataclass\n@dataclass\nclass Rack:\n    n: int = 1\n" + FLAT)
    assert len(spec.load(write(tmp_path, body)).nodes) == 2


def test_params_for_a_yaml_file_are_refused():
    with pytest.raises(SpecError) as e:
        spec.load(TWO_RACKS, params={"leaves": 4})
    assert str(TWO_RACKS) in str(e.value) and "'leaves'" in str(e.value) and ".py" in str(e.value)
    assert spec.load(TWO_RACKS, params={}).name == "two-racks"     # none given is fine


def test_missing_generator_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        spec.load(tmp_path / "gone.py")


def test_parse_params_reads_yaml_scalars():
    assert spec.parse_params(["leaves=4", "name=big", "ratio=0.5", "flag=true", "empty="]) == \
        {"leaves": 4, "name": "big", "ratio": 0.5, "flag": True, "empty": ""}
    assert spec.parse_params(None) == {} and spec.parse_params(["a=1", "a=2"]) == {"a": 2}
    for bad in ("leaves", "=4"):
        with pytest.raises(SpecError, match="write NAME=VALUE"):
            spec.parse_params([bad])


# ------------------------------------------------------------------------------ command line

from cli_harness import NOT_ROOT  # noqa: E402  (run as "not root", no cluster can be built)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NOT_ROOT + code], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def cli(*args: str) -> subprocess.CompletedProcess:
    return _run(f"sys.argv = ['k8snetlab', *{list(args)!r}]\n"
                "runpy.run_module('k8snetlab.cli', run_name='__main__', alter_sys=True)\n")


def cni_modes(*args: str) -> subprocess.CompletedProcess:
    return _run(f"sys.argv = [{str(CNI_MODES)!r}, *{list(args)!r}]\n"
                f"runpy.run_path({str(CNI_MODES)!r}, run_name='__main__')\n")


def one_error_line(p: subprocess.CompletedProcess, prog: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in p.stderr
    return lines[0]


def test_up_unknown_param_lists_the_valid_ones():
    line = one_error_line(cli("up", str(LEAF_SPINE), "--param", "leavs=4"), "k8snetlab")
    assert "'leavs'" in line and "leaves" in line and "nodes_per_leaf" in line and "spines" in line


def test_up_param_without_value():
    line = one_error_line(cli("up", str(LEAF_SPINE), "--param", "leaves"), "k8snetlab")
    assert "NAME=VALUE" in line


def test_up_param_for_a_yaml_file():
    line = one_error_line(cli("up", str(TWO_RACKS), "--param", "leaves=4"), "k8snetlab")
    assert str(TWO_RACKS) in line and "'leaves'" in line


def test_up_valid_params_reach_the_root_check():
    line = one_error_line(cli("up", str(LEAF_SPINE), "--param", "leaves=3", "--param", "nodes_per_leaf=1"),
                          "k8snetlab")
    assert "root" in line and "sudo" in line


def test_experiment_takes_params_too():
    line = one_error_line(cni_modes("--topology", str(LEAF_SPINE), "--param", "leaves=0"), CNI_MODES.name)
    assert "parameter leaves" in line and "out of range" in line
    line = one_error_line(cni_modes("--topology", str(LEAF_SPINE), "--param", "leaves=3"), CNI_MODES.name)
    assert "root" in line


def test_experiment_unknown_mode():
    line = one_error_line(cni_modes("--modes", "vxlan,weave"), CNI_MODES.name)
    assert "'weave'" in line and "ipip-crosssubnet" in line
