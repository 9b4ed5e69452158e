"""The ``bgp`` mode on a flat underlay: real BIRD and ExaBGP speakers reach Established, the
kernel FIBs hold every node's pod CIDR (from BIRD: ``proto bird``, from our ExaBGP installer:
``proto bgp``), pods reach each other with plain routed packets, the session counts follow the
mesh and route-reflector formulas, ``k8snetlab bgp status`` and the Mininet CLI show what the
speakers say, and nothing is left after the cluster stops."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from bgp_helpers import assert_gone, require_bgp, started
from helpers import REPO, THREE_NODES, clean_cli, require_root_and, up_then_kill_9, wait_for

from k8snetlab import proc, spec
from k8snetlab.bgp import fib, plan
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration

PROTO = {"bird": "proto bird", "exabgp": "proto bgp"}
SPEAKERS = {"bird": {}, "exabgp": {"speaker": "exabgp"}, "mixed": {"speakers": {"node2": "exabgp"}}}


def routes_of(host) -> str:
    return host.run(["ip", "-o", "-4", "route"]).stdout


def everyone_has_everyone(c: Cluster, nodes=None) -> bool:
    nodes = nodes or list(c.nodes)
    return all(str(c.nodes[b].spec.pod_cidr) in fib.prefixes(c.nodes[a].pid)
               for a in nodes for b in nodes if a != b)


def flat_spec(n: int, **bgp) -> spec.ClusterSpec:
    """N nodes on one subnet, one sleeping pod per node (``probe-0`` on node1, ...)."""
    return spec.from_dict({
        "name": f"flat-{n}",
        "underlay": {"subnets": [{"name": "lan", "cidr": "192.168.0.0/16"}]},
        "nodes": [{"name": f"node{i + 1}", "ip": f"192.168.1.{10 + i}"} for i in range(n)],
        "cni": {"type": "bgp", "invoke": "inprocess", "bgp": {"holdTime": 3, **bgp}},
        "workloads": [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "probe"},
                       "spec": {"replicas": n, "selector": {"matchLabels": {"app": "probe"}},
                                "template": {"metadata": {"labels": {"app": "probe"}},
                                             "spec": {"containers": [{"name": "c", "command": ["sleep", "600"]}]}}}}]},
        f"flat-{n}.yaml")


# ------------------------------------------------------------------------ full mesh: bird, exabgp, mixed

@pytest.fixture(scope="module", params=sorted(SPEAKERS))
def mesh(request):
    require_bgp()
    s = spec.with_cni(spec.load(THREE_NODES), "bgp", bgp={"holdTime": 9, **SPEAKERS[request.param]}, invoke="inprocess")
    c, record = started(s)
    yield c
    c.stop()
    assert_gone(record)


def speaker_of(c: Cluster, node: str) -> str:
    return plan.speaker_of(node, c.spec.cni.options)


def test_sessions_established_and_counted(mesh):
    st = mesh.mode.status(list(mesh.nodes))
    for name, s in st.items():
        assert s.running and s.speaker == speaker_of(mesh, name)
        assert {x.peer for x in s.sessions} == set(mesh.nodes) - {name}
        assert all(x.established for x in s.sessions), [(x.peer, x.state) for x in s.sessions]
    assert sum(s.established() for s in st.values()) / 2 == plan.mesh_sessions(3) == 3


def test_fib_holds_every_pod_cidr_from_the_speaker(mesh):
    for name, node in mesh.nodes.items():
        lines = routes_of(node).splitlines()
        proto = PROTO[speaker_of(mesh, name)]
        own = str(node.spec.pod_cidr)
        assert any(line.startswith(f"blackhole {own}") and proto in line for line in lines), lines
        for other in mesh.nodes.values():
            if other is node:
                continue
            want = f"{other.spec.pod_cidr} via {other.spec.ip} dev eth0 {proto}"
            assert any(line.startswith(want) for line in lines), f"{name} lacks '{want}': {lines}"
        assert "tunl0" not in node.run(["ip", "-o", "link"]).stdout


def test_pods_reach_each_other_with_mtu_1500(mesh):
    pods = sorted(mesh.pods.values(), key=lambda p: p.name)
    src = pods[0]
    assert "mtu 1500" in src.run(["ip", "-o", "link", "show", "dev", "eth0"]).stdout
    assert "default via 169.254.1.1" in src.run(["ip", "route"]).stdout
    for dst in pods[1:]:
        r = src.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False)
        assert r.returncode == 0, f"{src.name} -> {dst.name} ({dst.ip}) with {mesh.spec.cni.options}: {r.stdout}"


def test_bgp_status_command_asks_the_speakers(mesh):
    r = subprocess.run([sys.executable, "-m", "k8snetlab.cli", "bgp", "status", "--cluster", mesh.state.path.name],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for name in mesh.nodes:
        assert f"{name} ({speaker_of(mesh, name)}): 2/2 sessions established, 3 prefixes" in r.stdout, r.stdout
    assert r.stdout.count("Established") == 6


def test_a_joining_and_a_leaving_node_change_the_sessions(mesh):
    """add_node: the running speakers are reconfigured (birdc configure, ExaBGP's reload) and
    peer with the new node; remove_node: its sessions and routes go."""
    node4 = mesh.add_node("node4", "192.168.1.132")
    try:
        cidr = str(node4.spec.pod_cidr)
        assert wait_for(lambda: everyone_has_everyone(mesh), 15), mesh.mode.missing_routes()
        assert wait_for(lambda: mesh.mode.status(["node1"])["node1"].established() == 3, 10)
        assert mesh.mode.status(["node4"])["node4"].established() == 3
    finally:
        mesh.remove_node("node4")
    assert wait_for(lambda: not any(cidr in fib.prefixes(h.pid) for h in mesh.nodes.values()), 10)

    def back_to_three() -> bool:        # ExaBGP answers again once its reload is done
        return all({x.peer for x in st.sessions if x.established} == set(mesh.nodes) - {name}
                   and len(st.sessions) == 2 for name, st in mesh.mode.status(list(mesh.nodes)).items())
    assert wait_for(back_to_three, 10, every=0.2), mesh.mode.status_table()


# ------------------------------------------------------------------------ route reflectors

@pytest.fixture(scope="module")
def rr():
    require_bgp()
    c, record = started(flat_spec(6, topology="route-reflector", reflectors=["node1", "node2"],
                                  speakers={"node6": "exabgp"}))
    yield c
    c.stop()
    assert_gone(record)


def test_route_reflector_session_counts(rr):
    st = rr.mode.status(list(rr.nodes))
    assert wait_for(lambda: sum(s.established() for s in rr.mode.status(list(rr.nodes)).values()) == 2 * 9, 10)
    st = rr.mode.status(list(rr.nodes))
    per_node = {n: s.established() for n, s in st.items()}
    assert per_node == {"node1": 5, "node2": 5, "node3": 2, "node4": 2, "node5": 2, "node6": 2}
    assert sum(per_node.values()) / 2 == plan.rr_sessions(6, 2) == 9 < plan.mesh_sessions(6)
    assert {x.peer for x in st["node4"].sessions} == {"node1", "node2"}
    assert everyone_has_everyone(rr)


def test_losing_one_of_two_reflectors_loses_no_route(rr):
    hold = rr.spec.cni.options.hold_time
    gone = str(rr.nodes["node1"].spec.pod_cidr)
    rest = [n for n in rr.nodes if n != "node1"]
    client_a, client_b = rr.pods["probe-2"], rr.pods["probe-5"]       # on node3 and node6 (exabgp)
    assert (client_a.node_name, client_b.node_name) == ("node3", "node6")
    rr.mode.stop_speaker("node1", graceful=False)
    try:
        # the reflector's own block goes (its speaker is gone) ...
        assert wait_for(lambda: not any(gone in fib.prefixes(rr.nodes[n].pid) for n in rest), hold + 1)
        # ... and every other route stays, also once the sessions to it have timed out
        time.sleep(hold)
        assert everyone_has_everyone(rr, rest), {n: sorted(fib.prefixes(rr.nodes[n].pid)) for n in rest}
        assert client_a.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", client_b.ip], check=False).returncode == 0
    finally:
        rr.mode.start_speaker("node1")
    assert wait_for(lambda: everyone_has_everyone(rr), 15)


# ------------------------------------------------------------------------ bad input, as root: nothing built

@pytest.mark.parametrize("options", [{"speaker": "quagga"}, {"topology": "route-reflector", "reflectors": ["nodeX"]},
                                     {"asNumber": 0}, {"peerWithToR": True}])
def test_up_refuses_bad_options_before_building_anything(options, tmp_path):
    require_root_and("mnexec")
    d = yaml.safe_load(THREE_NODES.read_text())
    d["cni"] = {"type": "bgp", "bgp": options}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    p = subprocess.Popen([sys.executable, "-m", "k8snetlab.cli", "up", str(path)], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2 and len(err.splitlines()) == 1 and str(path) in err and not out, err
    root = Path("/run/k8snetlab")
    owners = [json.loads((x / "owner.json").read_text()).get("pid") for x in root.glob("knl*")
              if (x / "owner.json").exists()] if root.is_dir() else []
    assert p.pid not in owners, "a state directory of the refused run is left"


# ------------------------------------------------------------------------ Mininet CLI

def test_mininet_cli_bgp_command():
    require_bgp()
    r = subprocess.run([sys.executable, "-m", "k8snetlab.cli", "up", str(THREE_NODES), "--cni", "bgp", "--cli"],
                       cwd=REPO, input="bgp\nexit\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    seen = r.stdout + r.stderr
    assert "node1 (bird): 2/2 sessions established" in seen, seen
    assert "cluster stopped and removed" in r.stdout


# ------------------------------------------------------------------------ kill -9 of the runtime, then clean

def test_kill_9_then_clean_stops_every_speaker(tmp_path):
    """BIRD, ExaBGP and its route installer outlive a killed runtime until ``k8snetlab clean``,
    which finds them by the PIDs and namespaces the cluster recorded."""
    require_bgp()
    from k8snetlab.bgp.speakers import _descendants
    d = yaml.safe_load(THREE_NODES.read_text())
    d["cni"] = {"type": "bgp", "invoke": "inprocess", "bgp": {"holdTime": 9, "speakers": {"node3": "exabgp"}}}
    path = tmp_path / "bgp.yaml"
    path.write_text(yaml.safe_dump(d))
    with up_then_kill_9(str(path)) as state:
        descs = [json.loads(f.read_text()) for f in sorted(state.glob("nodes/*/bgp-speaker.json"))]
        assert [x["speaker"] for x in descs] == ["bird", "bird", "exabgp"]
        speakers = [(x["pid"], x["start"]) for x in descs]
        speakers += _descendants(descs[2]["pid"])          # ExaBGP's route installer and CLI helper
        assert len(speakers) >= 4 and all(proc.running(pid, start) for pid, start in speakers)
    assert any(proc.running(pid, start) for pid, start in speakers), "nothing survived: clean is not tested"
    r = clean_cli()
    assert r.returncode == 0, r.stderr
    assert not [pid for pid, start in speakers if proc.running(pid, start)], r.stdout
    assert not state.exists()
