"""An Open vSwitch underlay driven by the l2_learning controller app: pods reach each other
across it (TCP too: the userspace datapath needs the hosts' checksum offload off), the app's
learned flows are there for ``ovs-ofctl dump-flows`` to show, and stopping the cluster (or a
``kill -9`` followed by ``k8snetlab clean``) leaves no controller, OVS daemon, bridge or
namespace behind."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from helpers import clean_cli, seen_source, up_then_kill_9
from ovs_helpers import assert_gone, netns_alive, require_ovs, three_nodes_on_ovs
from k8snetlab import proc, spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    require_ovs()
    c = Cluster(spec.from_dict(three_nodes_on_ovs("l2_learning"), "three_nodes.yaml (ovs)"))
    c.start()
    yield c
    c.stop()


def mac(host) -> str:
    return json.loads(host.run(["ip", "-j", "link", "show", "dev", "eth0"]).stdout)[0]["address"]


def test_pods_and_nodes_reach_each_other(cluster):
    hosts = [*cluster.nodes.values(), *cluster.pods.values()]
    src = cluster.pods["web-0"]
    for dst in hosts:
        if dst is not src:
            r = src.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False)
            assert r.returncode == 0, f"{src.name} -> {dst.name} ({dst.ip}): {r.stdout}"


def test_tcp_across_the_userspace_datapath_keeps_the_pod_ip(cluster, tmp_path):
    client, server = cluster.pods["web-0"], cluster.pods["web-1"]
    assert client.node_name != server.node_name
    assert seen_source(server, client, server.ip, tmp_path) == client.ip


def test_learned_flows_are_visible_with_ovs_ofctl(cluster):
    n1, n2 = cluster.nodes["node1"], cluster.nodes["node2"]
    n1.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", n2.ip])
    bridge = next(iter(cluster.switches.values())).name
    # what a user types (OVS_RUNDIR points ovs-ofctl at this cluster's private Open vSwitch)
    out = proc.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", bridge],
                   env={**os.environ, "OVS_RUNDIR": str(cluster.ovs.run_dir)}).stdout
    learned = [l for l in out.splitlines() if "cookie=0x12" in l]
    a, b = mac(n1), mac(n2)
    assert any(f"dl_src={a},dl_dst={b}" in l for l in learned), out
    assert any(f"dl_src={b},dl_dst={a}" in l for l in learned), out
    assert all("idle_timeout=60" in l for l in learned)
    assert any("priority=0 actions=CONTROLLER" in l for l in out.splitlines()), out   # the table miss
    # the same through Mininet's dpctl (the CLI's "dpctl dump-flows")
    assert "cookie=0x12" in cluster.switches["lan"].dpctl("dump-flows")


def test_describe_names_the_underlay(cluster):
    line = cluster.describe()[1]
    assert "Open vSwitch" in line and "controller l2_learning" in line and "db.sock" in line


def test_a_node_joining_plugs_into_the_running_switch(cluster):
    node = cluster.add_node("node4", "192.168.1.132")
    try:
        (pod,) = cluster.add_pod({"kind": "Pod", "metadata": {"name": "late"},
                                  "spec": {"nodeName": "node4",
                                           "containers": [{"name": "c", "command": ["sleep", "600"]}]}})
        assert pod.run(["ping", "-c", "1", "-W", "2", cluster.pods["web-0"].ip], check=False).returncode == 0
        ports = cluster.ovs.ofctl("dump-ports-desc", cluster.switches["lan"].name)
        port = node.intfList()[0].link.intf2.name
        assert port in ports
    finally:
        cluster.delete_pod("late")
        cluster.remove_node("node4")
    assert port not in cluster.ovs.vsctl("list-ports", cluster.switches["lan"].name).split()


def test_stop_removes_controller_ovs_and_bridges(cluster):
    """Last in this module: stops the shared cluster (the fixture's stop is then a no-op)."""
    ovs = cluster.ovs
    state, prefix = cluster.state.path, cluster.state.prefix
    inode = os.stat(ovs.netns).st_ino
    pids = {**ovs.pids(), **{f"switch {s.name}": s.pid for s in cluster.switches.values()}}
    starts = {what: proc.start_time(pid) for what, pid in pids.items()}
    bridges = ovs.vsctl("list-br").split()
    assert bridges == [s.name for s in cluster.switches.values()]
    cluster.stop()
    alive = [what for what, pid in pids.items() if proc.running(pid, starts[what])]
    assert alive == []
    assert_gone(state, prefix, inode)


def test_ovs_without_a_controller_is_a_standalone_learning_bridge():
    require_ovs()
    with Cluster(spec.from_dict(three_nodes_on_ovs("none"), "three_nodes.yaml (ovs, no controller)")) as c:
        assert c.ovs.pids().get("controller") is None
        src, dst = c.pods["web-0"], c.pods["web-2"]
        assert src.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False).returncode == 0
        (flow,) = c.ovs.flows(c.switches["lan"].name)
        assert "actions=NORMAL" in flow


def test_kill_9_then_clean_removes_the_ovs_underlay(tmp_path):
    require_ovs()
    f = tmp_path / "ovs.yaml"
    d = three_nodes_on_ovs("l2_learning", replicas=0)
    f.write_text(yaml.safe_dump(d))
    with up_then_kill_9(str(f), start_new_session=True) as state:
        records = [json.loads(l) for l in (state / "pids.jsonl").read_text().splitlines()]
        ovs_ns = [json.loads(l)["ino"] for l in (state / "netns.jsonl").read_text().splitlines()
                  if json.loads(l)["what"] == "Open vSwitch"]
        assert len(ovs_ns) == 1 and netns_alive(ovs_ns[0])
        daemons = [r for r in records if r["what"] in ("ovsdb-server", "ovs-vswitchd", "controller l2_learning")]
        assert len(daemons) == 3
    assert [r for r in daemons if proc.running(r["pid"], r["start"])], "kill -9 left nothing to clean"
    r = clean_cli()
    assert r.returncode == 0, r.stderr
    assert [d for d in daemons if proc.running(d["pid"], d["start"])] == []
    assert_gone(state, state.name, ovs_ns[0])
