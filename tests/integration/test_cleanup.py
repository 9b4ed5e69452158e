"""Nothing the testbed made survives a run: normal stop, an exception, a kill -9 + clean.

Other clusters may be alive on the machine meanwhile: each test checks only what *its*
cluster made (its state dir, its ``knl<index>`` links, its processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO, THREE_NODES, clean_cli, require_root_and, up_then_kill_9
from leftover_check import Footprint
from k8snetlab import naming, proc, spec, statedir
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration


def processes_alive(records):
    return [r for r in records if r["start"] and proc.running(r["pid"], r["start"])]


def links_of(index: int) -> list[str]:
    return [n for n in os.listdir("/sys/class/net") if naming.cluster_index_of(n) == index]




def test_exception_inside_the_cluster_leaves_nothing():
    require_root_and("mnexec", "brctl")
    with pytest.raises(ZeroDivisionError):
        with Cluster(spec.load(THREE_NODES, cni="host-gw")) as c:
            pids = [(h.pid, proc.start_time(h.pid)) for h in [*c.nodes.values(), *c.pods.values()]]
            footprint = Footprint(c)
            1 / 0
    footprint.assert_gone()
    assert not [p for p, start in pids if proc.running(p, start)]


def test_failed_start_leaves_nothing(monkeypatch):
    require_root_and("mnexec", "brctl")
    from k8snetlab import cluster as cluster_mod

    def broken(self, pod):
        raise cluster_mod.K8sNetLabError("injected CNI failure")
    from k8snetlab import kubelet as kubelet_mod
    monkeypatch.setattr(kubelet_mod.Kubelet, "cni_add", broken)
    c = Cluster(spec.load(THREE_NODES, cni="host-gw"))
    with pytest.raises(cluster_mod.K8sNetLabError, match="injected"):
        c.start()
    assert c.state is not None
    assert not c.state.path.exists() and links_of(c.state.index) == []


@pytest.mark.parametrize("mode", ["host-gw", "ipip"])
def test_kill_9_then_clean_removes_everything(mode):
    require_root_and("mnexec", "brctl", "tc", "clang", "bpftool")
    with up_then_kill_9(str(THREE_NODES), "--cni", mode) as state:
        # a container process in a pod: the runtime must find it via the state dir
        records = [json.loads(l) for l in open(state / "pids.jsonl")]
        assert processes_alive(records)
        index = naming.cluster_index_of(state.name)
    time.sleep(0.2)
    assert state.exists() and links_of(index), "kill -9 left nothing: the test cannot tell clean works"
    r = clean_cli()
    assert r.returncode == 0, r.stderr
    assert f"removed cluster state: {state.name}" in r.stdout
    assert not state.exists() and links_of(index) == [], r.stdout
    assert processes_alive(records) == []
    # a second clean finds nothing of it
    r2 = clean_cli()
    assert r2.returncode == 0 and state.name not in r2.stdout


def test_clean_leaves_a_live_cluster_alone():
    require_root_and("mnexec", "brctl")
    with Cluster(spec.load(THREE_NODES, cni="host-gw")) as c:
        footprint = Footprint(c)
        r = clean_cli()
        assert r.returncode == 0
        src, dst = c.pods["web-0"], c.pods["web-1"]
        assert src.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False).returncode == 0
    footprint.assert_gone()


def test_missing_tool_is_one_line_exit_2(tmp_path):
    require_root_and("mnexec")
    (tmp_path / "python3").symlink_to(sys.executable)   # the containers' command is there,
    env = {**os.environ, "PATH": str(tmp_path)}          # but no mnexec, brctl... on PATH
    p = subprocess.Popen([sys.executable, "-m", "k8snetlab.cli", "up", str(THREE_NODES)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2, err
    assert "not installed" in err and "apt-get install" in err
    assert err.strip().count("\n") == 0
    # no state dir of that run (others' clusters may come and go meanwhile)
    for root in statedir.state_roots():
        for owner in root.glob("knl*/owner.json"):
            try:
                assert json.loads(owner.read_text())["pid"] != p.pid, f"the refused run left {owner.parent}"
            except (OSError, ValueError):
                pass
