"""Bad input on the command line: exit status 2 and exactly one line on stderr.

``k8snetlab up`` and the experiments validate the cluster file before they check for root,
so every case here runs (and fails fast) without privileges. The commands run as real
processes from the repository root. When the test suite itself runs as root, the process
is told it is not root (``os.geteuid`` is replaced before the CLI starts): the tests then
show that validation comes first, and a regression that let a bad file through could
still never build a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_harness import EXPERIMENT_PROG, THREE_NODES, cli, cluster, experiment, one_error_line, run


# ------------------------------------------------------------------------ cluster files

def two_subnets(cni_type: str) -> dict[str, Any]:
    d = cluster(cni={"type": cni_type})
    d["underlay"] = {"subnets": [{"name": "lan", "cidr": "192.168.1.0/24", "gateway": "192.168.1.1"},
                                 {"name": "lan2", "cidr": "192.168.2.0/24", "gateway": "192.168.2.1"}],
                     "routers": [{"name": "r1", "interfaces": [{"subnet": "lan", "ip": "192.168.1.1"},
                                                              {"subnet": "lan2", "ip": "192.168.2.1"}]}]}
    d["nodes"][2]["ip"] = "192.168.2.10"
    return d


def overlapping_cidrs() -> dict[str, Any]:
    d = cluster()
    d["network"]["serviceCIDR"] = "10.244.0.0/20"
    return d


def unknown_key() -> dict[str, Any]:
    return cluster(pods=[])


def unknown_type() -> dict[str, Any]:
    return cluster(cni={"type": "weave"})


BAD_FILES = {
    # id: (content, substrings of the error line)
    "malformed-yaml": ("name: x\nnodes: [a, b\n", ["not valid YAML", "line 3"]),
    "unknown-key": (unknown_key, ["unknown key 'pods'", "valid keys"]),
    "overlapping-cidrs": (overlapping_cidrs, ["network.clusterCIDR", "network.serviceCIDR", "overlaps"]),
    "unknown-cni-type": (unknown_type, ["'weave'", "bridge", "host-gw", "ipip"]),
    "host-gw-two-subnets": (lambda: two_subnets("host-gw"), ["host-gw", "node1", "node3"]),
    "ipip-bad-option": (lambda: cluster(cni={"type": "ipip", "ipip": {"ipipMode": "Never"}}),
                        ["cni.ipip.ipipMode", "'Never'", "CrossSubnet"]),
    "not-a-mapping": ("- just\n- a list\n", ["mapping"]),
}


@pytest.fixture
def bad_file(tmp_path):
    def make(case: str) -> tuple[Path, list[str]]:
        content, expected = BAD_FILES[case]
        path = tmp_path / f"{case}.yaml"
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content(), sort_keys=False))
        return path, expected
    return make


# ------------------------------------------------------------------------ k8snetlab up

def test_up_malformed_yaml_plain_invocation(tmp_path):
    """Exactly what a user types: ``python -m k8snetlab.cli up FILE`` (the file cannot be built,
    so this is safe as root too)."""
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nnodes: [a, b\n")
    line = one_error_line(run(["-m", "k8snetlab.cli", "up", str(path)]))
    assert str(path) in line and "line 3" in line


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_up_bad_file(bad_file, case):
    path, expected = bad_file(case)
    line = one_error_line(cli("up", str(path)))
    assert "needs root" not in line, "the file is validated before the root check"
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"


def test_up_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    line = one_error_line(cli("up", str(path)))
    assert str(path) in line and "cannot read" in line


def test_up_unknown_cni_override_lists_valid_types():
    line = one_error_line(cli("up", str(THREE_NODES), "--cni", "bogus"))
    assert "'bogus'" in line
    for name in ("bridge", "host-gw", "ipip"):
        assert name in line


def test_up_cni_override_is_validated(tmp_path):
    path = tmp_path / "routed.yaml"
    path.write_text(yaml.safe_dump(two_subnets("ipip")))
    line = one_error_line(cli("up", str(path), "--cni", "host-gw"))
    assert "host-gw" in line and "node1" in line and "node3" in line


def test_up_valid_file_without_root_says_so():
    """A valid file gets as far as the root check: one line naming sudo, nothing built."""
    line = one_error_line(cli("up", str(THREE_NODES), "--cni", "ipip"))
    assert "root" in line and "sudo" in line


# ------------------------------------------------------------------------ the experiment

@pytest.mark.parametrize("case", ["malformed-yaml", "overlapping-cidrs", "unknown-cni-type", "unknown-key"])
def test_experiment_bad_topology(bad_file, case):
    path, expected = bad_file(case)
    line = one_error_line(experiment("--topology", str(path)), prog=EXPERIMENT_PROG)
    assert "needs root" not in line
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"


def test_experiment_refuses_a_topology_host_gw_cannot_wire(tmp_path):
    """The experiment runs host-gw too: nodes on two subnets are refused before anything is built."""
    path = tmp_path / "routed.yaml"
    path.write_text(yaml.safe_dump(two_subnets("ipip")))
    line = one_error_line(experiment("--topology", str(path)), prog=EXPERIMENT_PROG)
    assert "host-gw" in line and "node1" in line and "node3" in line


def test_experiment_missing_topology(tmp_path):
    path = tmp_path / "nope.yaml"
    line = one_error_line(experiment("--topology", str(path)), prog=EXPERIMENT_PROG)
    assert str(path) in line


def test_experiment_too_few_pings():
    line = one_error_line(experiment("--pings", "10"), prog=EXPERIMENT_PROG)
    assert "--pings" in line


def test_experiment_valid_topology_without_root_says_so():
    line = one_error_line(experiment("--topology", str(THREE_NODES)), prog=EXPERIMENT_PROG)
    assert "root" in line and "sudo" in line


# ------------------------------------------------------------------------ compare

@pytest.mark.parametrize("content", ["name: x\nnodes: []\n", "\x00\x01 binary \xff", ""])
def test_compare_non_csv(tmp_path, content):
    """Exit 2 (bad input) is what the CLI promises; 1 (a failure) is tolerated for now."""
    path = tmp_path / "not.csv"
    path.write_bytes(content.encode("latin-1"))
    p = cli("compare", str(path), str(path))
    assert p.returncode in (1, 2), (p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("k8snetlab: "), p.stderr
    assert "Traceback" not in p.stderr
    assert str(path) in lines[0]


def test_compare_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    p = cli("compare", str(path), str(path))
    assert p.returncode in (1, 2), (p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("k8snetlab: ") and str(path) in lines[0], p.stderr
