"""``k8snetlab clean`` removes only what a dead cluster of ours made, in every state root.

Other clusters (other users, other test runs) live on the same machine: a link that merely
starts with ``knl`` is reported and left alone, a cluster running under another
``K8SNETLAB_STATE`` keeps its underlay, and a dead cluster's leftovers under that other root
are still removed by a plain ``clean``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, THREE_NODES, clean_cli, require_root_and, up_then_kill_9
from k8snetlab import naming, proc, statedir

pytestmark = pytest.mark.integration


def links_of(index: int) -> list[str]:
    return sorted(n for n in os.listdir("/sys/class/net") if naming.cluster_index_of(n) == index)


def index_of(state: Path) -> int:
    idx = naming.cluster_index_of(state.name)
    assert idx is not None, state
    return idx


@pytest.fixture
def foreign_bridges():
    """Two bridges someone else made, named like ours (knl7 and knl42x)."""
    require_root_and("ip")
    names = ["knl7", "knl42x"]
    made = []
    try:
        for name in names:
            if os.path.exists(f"/sys/class/net/{name}"):
                pytest.skip(f"an interface {name} already exists on this machine")
            proc.run(["ip", "link", "add", "name", name, "type", "bridge"])
            made.append(name)
        yield names
    finally:
        for name in made:
            proc.run(["ip", "link", "del", name], check=False)


def test_clean_leaves_foreign_knl_links_alone_and_says_so(foreign_bridges):
    r = clean_cli()
    assert r.returncode == 0, r.stderr
    live = {naming.cluster_index_of(d.name) for root in statedir.state_roots() for d in root.glob("knl*")
            if statedir.owner_alive(d)}
    for name in foreign_bridges:
        assert os.path.exists(f"/sys/class/net/{name}"), f"clean deleted a foreign link {name}"
        assert f"removed interface: {name}" not in r.stdout
        if naming.cluster_index_of(name) not in live:   # (beside a live cluster of that index it
            assert f"left alone: interface {name}" in r.stdout, r.stdout   # is not even reported)


def test_a_live_cluster_under_another_state_root_survives_clean(tmp_path):
    require_root_and("mnexec", "brctl")
    env = {**os.environ, "K8SNETLAB_STATE": str(tmp_path / "other-root")}
    p = subprocess.Popen([sys.executable, "-m", "k8snetlab.cli", "up", str(THREE_NODES), "--cni", "host-gw"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        state = None
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("up in"):
                state = Path(line.rsplit("state in", 1)[1].strip())
                break
        assert state is not None, "the cluster did not come up"
        before = links_of(index_of(state))
        assert before, "the live cluster has no underlay links: the test could not tell"
        r = clean_cli()              # the default state root: it must learn of the other one
        assert r.returncode == 0, r.stderr
        assert links_of(index_of(state)) == before, r.stdout
        assert (state / "owner.json").exists()
        assert p.poll() is None, "clean stopped the live cluster's runtime"
        recorded = {json.loads(line)["name"] for line in (state / "links.jsonl").read_text().splitlines()}
        assert set(before) <= recorded, "the cluster did not record its root-namespace links"
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) in (0, 130, 143)
        assert links_of(index_of(state)) == [] and not state.exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_dead_cluster_under_another_state_root_is_cleaned(tmp_path):
    require_root_and("mnexec", "brctl")
    env = {**os.environ, "K8SNETLAB_STATE": str(tmp_path / "other-root")}
    with up_then_kill_9(str(THREE_NODES), "--cni", "host-gw", env=env) as state:
        records = [json.loads(line) for line in (state / "pids.jsonl").read_text().splitlines()]
        idx = index_of(state)
    assert links_of(idx), "kill -9 left no links: the test could not tell"
    r = clean_cli()                  # plain clean, default state root
    assert r.returncode == 0, r.stderr
    assert links_of(idx) == [], r.stdout
    assert not state.exists(), r.stdout
    assert not [x for x in records if x["start"] and proc.running(x["pid"], x["start"])]
    assert f"removed cluster state: {state.name}" in r.stdout


def test_a_marked_link_of_a_dead_owner_without_state_is_removed(tmp_path):
    """The state root itself is gone (a removed temp dir): the link's mark says whose it was."""
    require_root_and("ip")
    name = "knl98zz"
    if os.path.exists(f"/sys/class/net/{name}"):
        pytest.skip(f"an interface {name} already exists")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)           # a process that has exited: its start time cannot match
    proc.run(["ip", "link", "add", "name", name, "type", "bridge"])
    try:
        Path(f"/sys/class/net/{name}/ifalias").write_text(statedir.link_mark(pid, 1, tmp_path / "gone" / "knl98"))
        r = clean_cli()
        assert not os.path.exists(f"/sys/class/net/{name}"), r.stdout
        assert f"removed interface: {name}" in r.stdout
    finally:
        proc.run(["ip", "link", "del", name], check=False)
