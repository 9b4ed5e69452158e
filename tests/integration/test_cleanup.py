"""Nothing the testbed made survives a run: normal stop, an exception, a kill -9 + clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO, THREE_NODES, clean_cli, require_root_and, up_then_kill_9
from k8snetlab import cleanup, proc, spec
from k8snetlab.cluster import Cluster

pytestmark = pytest.mark.integration


def processes_alive(records):
    return [r for r in records if r["start"] and proc.running(r["pid"], r["start"])]


def test_exception_inside_the_cluster_leaves_nothing():
    require_root_and("mnexec", "brctl")
    with pytest.raises(ZeroDivisionError):
        with Cluster(spec.load(THREE_NODES, cni="host-gw")) as c:
            pids = [(h.pid, proc.start_time(h.pid)) for h in [*c.nodes.values(), *c.pods.values()]]
            1 / 0
    assert cleanup.leftovers().empty(), cleanup.leftovers().lines()
    assert not [p for p, start in pids if proc.running(p, start)]


def test_failed_start_leaves_nothing(monkeypatch):
    require_root_and("mnexec", "brctl")
    from k8snetlab import cluster as cluster_mod

    def broken(self, pod):
        raise cluster_mod.K8sNetLabError("injected CNI failure")
    from k8snetlab import kubelet as kubelet_mod
    monkeypatch.setattr(kubelet_mod.Kubelet, "cni_add", broken)
    with pytest.raises(cluster_mod.K8sNetLabError, match="injected"):
        Cluster(spec.load(THREE_NODES, cni="host-gw")).start()
    assert cleanup.leftovers().empty(), cleanup.leftovers().lines()


@pytest.mark.parametrize("mode", ["host-gw", "ipip"])
def test_kill_9_then_clean_removes_everything(mode):
    require_root_and("mnexec", "brctl", "tc", "clang", "bpftool")
    with up_then_kill_9(str(THREE_NODES), "--cni", mode) as state:
        # a container process in a pod: the runtime must find it via the state dir
        records = [json.loads(l) for l in open(state / "pids.jsonl")]
        assert processes_alive(records)
    time.sleep(0.2)
    assert not cleanup.leftovers().empty(), "kill -9 left nothing: the test cannot tell clean works"
    r = clean_cli()
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stdout
    assert cleanup.leftovers().empty(), cleanup.leftovers().lines()
    assert processes_alive(records) == []
    # a second clean finds nothing
    r2 = clean_cli()
    assert "nothing to clean" in r2.stdout


def test_clean_leaves_a_live_cluster_alone():
    require_root_and("mnexec", "brctl")
    with Cluster(spec.load(THREE_NODES, cni="host-gw")) as c:
        r = clean_cli()
        assert r.returncode == 0
        src, dst = c.pods["web-0"], c.pods["web-1"]
        assert src.run(["ping", "-c", "1", "-W", "2", dst.ip], check=False).returncode == 0
    assert cleanup.leftovers().empty()


def test_missing_tool_is_one_line_exit_2(tmp_path):
    require_root_and("mnexec")
    env = {**os.environ, "PATH": str(tmp_path)}   # no mnexec, brctl... on PATH
    r = subprocess.run([sys.executable, "-m", "k8snetlab.cli", "up", str(THREE_NODES)], cwd=REPO,
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2, r.stderr
    assert "not installed" in r.stderr and "apt-get install" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert cleanup.leftovers().empty()
