"""Hostile and mistaken input is refused in one line, exit 2, before anything is built.

Binary files, YAML alias bombs, huge values quoted in a message, a pipe closed early, names
the add-ons need, programs that do not exist, topology generators that exit, address ranges
that cannot be routed, workload files outside the cluster file's directory, results files
that cannot be compared. Runs without root (the CLI is told it is not root, and building a
cluster is made impossible: see test_cli_errors).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8snetlab import spec
from k8snetlab.errors import MAX_MESSAGE, SpecError
from k8snetlab.results import COLUMNS

from cli_harness import REPO, THREE_NODES, cli, one_error_line

SERVICES = REPO / "topologies" / "services.yaml"


def base(**top: Any) -> dict[str, Any]:
    d = yaml.safe_load(THREE_NODES.read_text())
    d.update(top)
    return d


def write(tmp_path: Path, data: Any, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(path: Path, **kw: Any) -> str:
    with pytest.raises(SpecError) as e:
        spec.load(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= MAX_MESSAGE
    return msg


# ------------------------------------------------------------------ item 8: no tracebacks

BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe binary"


def test_binary_cluster_file_up_and_check_model(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(BINARY)
    for cmd in ("up", "check-model"):
        line = one_error_line(cli(cmd, str(path)))
        assert "not UTF-8 text" in line and str(path) in line


def test_binary_workload_file(tmp_path):
    (tmp_path / "w.yaml").write_bytes(BINARY)
    assert "not UTF-8 text" in load_error(write(tmp_path, base(workloads=[{"file": "w.yaml"}])))


BOMB = "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9 if p else ['x'] * 9)}]\n"
               for c, p in zip("abcdefgh", ["", *"abcdefg"]))


def test_yaml_alias_bomb_is_refused_quickly_in_one_short_line(tmp_path):
    data = THREE_NODES.read_text().replace("name: three-nodes", BOMB + "name: *h")
    path = write(tmp_path, data)
    t0 = time.monotonic()
    msg = load_error(path)
    assert "aliases" in msg and "expand to more than" in msg
    assert time.monotonic() - t0 < 10
    line = one_error_line(cli("up", str(path)))
    assert len(line) < 400


def test_a_huge_value_is_quoted_in_part():
    d = base()
    d["nodes"][0]["name"] = "X" * 5_000_000
    with pytest.raises(SpecError) as e:
        spec.from_dict(d, "c.yaml")
    assert len(str(e.value)) <= MAX_MESSAGE and "characters cut" in str(e.value)


def csv_file(tmp_path: Path, name: str, experiment: str, rows: int) -> Path:
    lines = [",".join(COLUMNS)]
    for i in range(rows):
        cells = {"run_id": "r1", "timestamp": "2026-01-01T00:00:00Z", "experiment": experiment,
                 "topology": "three_nodes", "mode": "host-gw", "datapath": "kernel", "scenario": f"s{i}",
                 "src": "a", "dst": "b", "round": "1", "metric": "rtt_p50", "value": "0.1", "unit": "ms",
                 "mtu": "1500", "kernel": "6.1"}
        lines.append(",".join(cells.get(c, "") for c in COLUMNS))   # later optional columns empty
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_compare_into_a_closed_pipe_is_quiet(tmp_path):
    a = csv_file(tmp_path, "a.csv", "hostgw_vs_ipip", 4000)      # a table far larger than a pipe
    p = subprocess.run(["sh", "-c", f"'{sys.executable}' -m k8snetlab.cli compare '{a}' '{a}' | head -n 2"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert p.stderr == "" and len(p.stdout.splitlines()) == 2


def test_compare_refuses_header_only_and_different_experiments(tmp_path):
    a = csv_file(tmp_path, "a.csv", "hostgw_vs_ipip", 3)
    empty = csv_file(tmp_path, "empty.csv", "hostgw_vs_ipip", 0)
    other = csv_file(tmp_path, "other.csv", "bgp_scale", 3)
    line = one_error_line(cli("compare", str(a), str(empty)))
    assert "no measurements" in line and str(empty) in line
    line = one_error_line(cli("compare", str(a), str(other)))
    assert "hostgw_vs_ipip" in line and "bgp_scale" in line and "same experiment" in line


# ------------------------------------------------------------------ item 9: early refusals

def test_container_command_that_does_not_exist(tmp_path):
    d = base()
    d["workloads"][0]["spec"]["template"]["spec"]["containers"][0]["command"] = ["/nonexistent/binary"]
    msg = load_error(write(tmp_path, d))
    assert "'/nonexistent/binary' is not an executable on this machine" in msg and "web" in msg
    d["workloads"][0]["spec"]["template"]["spec"]["containers"][0]["command"] = ["no-such-program-k8snetlab"]
    assert "'no-such-program-k8snetlab' is not an executable" in load_error(write(tmp_path, d))


@pytest.mark.parametrize("where, name", [("node", "external"), ("node", "lb"), ("pod", "external"),
                                         ("pod", "lb")])
def test_names_the_services_addon_takes_are_reserved(tmp_path, where, name):
    d = yaml.safe_load(SERVICES.read_text())
    if where == "node":
        d["nodes"][0]["name"] = name
    else:
        d["workloads"].append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                               "spec": {"containers": [{"name": "c", "command": ["sleep", "60"]}]}})
    msg = load_error(write(tmp_path, d))
    assert f"{where} name '{name}' is reserved in a cluster with Services" in msg


def test_reserved_names_are_free_without_services(tmp_path):
    d = base()
    d["nodes"][0]["name"] = "external"
    assert spec.load(write(tmp_path, d)).nodes[0].name == "external"


def test_topology_generator_calling_sys_exit(tmp_path):
    at_import = write(tmp_path, "import sys\nsys.exit(3)\n", "exits.py")
    line = one_error_line(cli("up", str(at_import)))
    assert "sys.exit(3)" in line
    in_cluster = write(tmp_path, "import sys\ndef cluster():\n    sys.exit('no')\n", "exits2.py")
    line = one_error_line(cli("up", str(in_cluster)))
    assert "cluster() called sys.exit('no')" in line


@pytest.mark.parametrize("value", [",", " , ,", ""])
def test_check_model_with_no_mode_refuses(value):
    line = one_error_line(cli("check-model", str(THREE_NODES), "--cni", value))
    assert "--cni" in line and "at least one mode" in line


# ------------------------------------------------------------------ item 10: values refused at load

def test_node_ip_equal_to_its_subnet_gateway(tmp_path):
    d = base()
    d["underlay"]["subnets"][0]["gateway"] = "192.168.1.129"
    msg = load_error(write(tmp_path, d))
    assert "node node1: ip 192.168.1.129 is the gateway of subnet lan" in msg


@pytest.mark.parametrize("key, cidr, what", [
    ("clusterCIDR", "127.0.0.0/16", "loopback"),
    ("clusterCIDR", "224.1.0.0/16", "multicast"),
    ("clusterCIDR", "169.254.0.0/16", "link-local"),
    ("clusterCIDR", "240.0.0.0/16", "reserved"),
    ("clusterCIDR", "0.0.0.0/16", "reserved"),
    ("serviceCIDR", "127.96.0.0/12", "loopback"),
    ("serviceCIDR", "239.96.0.0/16", "multicast"),
    ("serviceCIDR", "169.254.0.0/16", "link-local"),
    ("serviceCIDR", "250.0.0.0/16", "reserved"),
])
def test_cidrs_in_special_ranges(tmp_path, key, cidr, what):
    d = base()
    d["network"][key] = cidr
    msg = load_error(write(tmp_path, d))
    assert f"network.{key} {cidr} is in the {what}" in msg and "private unicast" in msg


def test_underlay_in_loopback(tmp_path):
    d = base()
    d["underlay"]["subnets"][0]["cidr"] = "127.1.1.0/24"
    for n, ip in zip(d["nodes"], ("127.1.1.2", "127.1.1.3", "127.1.1.4")):
        n["ip"] = ip
    assert "underlay subnet lan 127.1.1.0/24 is in the loopback" in load_error(write(tmp_path, d))


# ------------------------------------------------------------------ item 12: file references

def web_manifest() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "solo"},
            "spec": {"containers": [{"name": "c", "command": ["sleep", "60"]}]}}


def test_workload_files_resolve_relative_to_the_cluster_file(tmp_path, monkeypatch):
    d = tmp_path / "dir"
    (d / "manifests").mkdir(parents=True)
    write(d / "manifests", web_manifest(), "solo.yaml")
    path = write(d, base(workloads=[{"file": "manifests/solo.yaml"}]))
    monkeypatch.chdir(tmp_path)          # not the cluster file's directory
    assert [p.name for p in spec.load(path).pods()] == ["solo"]


@pytest.mark.parametrize("ref", ["/etc/passwd", "../outside.yaml", "link.yaml"])
def test_workload_files_outside_the_directory_are_refused(tmp_path, monkeypatch, ref):
    d = tmp_path / "dir"
    d.mkdir()
    write(tmp_path, web_manifest(), "outside.yaml")
    (d / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    path = write(d, base(workloads=[{"file": ref}]))
    monkeypatch.delenv("K8SNETLAB_ALLOW_OUTSIDE_FILES", raising=False)
    msg = load_error(path)
    assert "outside the cluster file's directory" in msg and "--allow-outside-files" in msg
    line = one_error_line(cli("up", str(path)))
    assert "outside the cluster file's directory" in line
    if ref != "/etc/passwd":
        monkeypatch.setenv("K8SNETLAB_ALLOW_OUTSIDE_FILES", "1")
        assert [p.name for p in spec.load(path).pods()] == ["solo"]
        # the CLI option: validation passes, then 'not root' is the refusal
        line = one_error_line(cli("up", "--allow-outside-files", str(path)))
        assert "root" in line
