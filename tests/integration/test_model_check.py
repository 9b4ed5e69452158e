"""check-model: Docker's default network fails the Kubernetes network model where it should,
with evidence; a CNI mode passes it; port publishing and MASQUERADE behave as Docker's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import REPO, THREE_NODES, require_root_and, seen_source
from leftover_check import running
from k8snetlab import conformance, spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration


def docker_spec(tmp_path):
    d = yaml.safe_load(THREE_NODES.read_text())
    d["cni"] = {"type": "docker"}
    d["workloads"][0]["spec"]["replicas"] = 3
    d["workloads"][0]["spec"]["template"]["spec"]["containers"][0]["ports"][0]["hostPort"] = 8080
    path = tmp_path / "docker.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    require_root_and("mnexec", "brctl", "iptables")
    with running(Cluster(spec.load(docker_spec(tmp_path_factory.mktemp("docker"))))) as c:
        yield c


def test_docker_gives_every_node_the_same_addresses(docker):
    ips = {p.node_name: p.ip for p in docker.pods.values()}
    assert set(ips.values()) == {"172.17.0.2"}, ips


def test_docker_fails_a_with_evidence_and_passes_localhost(docker):
    checks = conformance.ModelChecker(docker).run()
    s = conformance.summarize(checks)
    # every node has 172.17.0.0/16 on its own docker0: (b) fails as (a) does (README says so)
    assert s["a"][2] is False and s["b"][2] is False and s["c"][2] is False
    assert s["container-to-container"][2] is True
    evidence = [c.evidence for c in checks if c.check == "a" and c.passed is False]
    # the pod IP of another node's pod is answered by a pod of the client's own node
    assert any("answered by" in e for e in evidence), evidence[:3]
    # through the published port it arrives, but masqueraded to the client node's address
    node_ips = {n.ip for n in docker.nodes.values()}
    assert any(e.startswith("seen source ") and e.split()[2].rstrip(",") in node_ips for e in evidence), evidence[:3]
    # the probe's published ports are gone again
    out = docker.nodes["node1"].run(["iptables-save", "-t", "nat"]).stdout
    assert f"--dport {conformance.PUBLISHED_BASE}" not in out


def test_docker_published_port_is_masqueraded(docker, tmp_path):
    """-p 8080:8080: reachable on the node IP from another node, the server sees that node."""
    a = next(p for p in docker.pods.values() if p.node_name == "node1")
    b = next(p for p in docker.pods.values() if p.node_name == "node2")
    r = a.run(["python3", "-c", "import urllib.request as u; print(u.urlopen('http://%s:8080/', timeout=3).status)"
               % docker.nodes["node2"].ip])
    assert r.stdout.strip() == "200"
    # a server in b on a port node2 publishes: it sees node1's address, not a's
    docker.mode.publish(b, 7071, 7071)
    try:
        seen = seen_source(b, a, docker.nodes["node2"].ip, tmp_path, port=7071)
    finally:
        docker.mode.unpublish(b, 7071, 7071)
    assert seen == docker.nodes["node1"].ip, f"{seen} (pod a is {a.ip})"


def test_cni_mode_passes_the_model():
    require_root_and("mnexec", "brctl")
    found = conformance.check_modes(spec.load(THREE_NODES), ["host-gw"])
    s = conformance.summarize(found["host-gw"])
    bad = [c for c in found["host-gw"] if c.passed is False]
    assert all(s[k][2] is True for k in conformance.REQUIREMENTS), bad[:3]
    assert s["a"][1] == 30   # 6 pods: every ordered pair


def test_check_model_cli_exit_status_and_csv(tmp_path):
    require_root_and("mnexec", "brctl", "iptables")
    csv = tmp_path / "model.csv"
    r = subprocess.run([sys.executable, "-m", "k8snetlab.cli", "check-model", str(docker_spec(tmp_path)),
                        "--csv", str(csv)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr       # a requirement failed
    assert "FAIL  (a)" in r.stdout
    rows = csv.read_text().splitlines()
    assert rows[0] == ",".join(conformance.CHECK_COLUMNS) and len(rows) > 30
