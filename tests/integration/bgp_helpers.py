"""Shared pieces of the ``bgp`` mode tests: the tools they need, starting a cluster while
recording what must be gone after it stops, and checking that it is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import require_root_and

from k8snetlab import proc, spec
from k8snetlab.cluster import Cluster


def require_bgp() -> None:
    require_root_and("mnexec", "brctl", "bird", "birdc")
    try:
        import exabgp  # noqa: F401
    except ImportError:
        pytest.skip("exabgp is not installed ('sudo make deps' installs it)")


def started(s: spec.ClusterSpec) -> tuple[Cluster, dict]:
    """Start a cluster; return it and what must be gone after it stops."""
    c = Cluster(s)
    c.start()
    assert c.state is not None
    record = {"state": c.state.path, "prefix": c.state.prefix,
              "pids": [(d.pid, proc.start_time(d.pid)) for d in c.mode.speakers.values() if d.pid]}
    return c, record


def assert_gone(record: dict) -> None:
    """Nothing of this cluster survives: state dir, speaker processes (and their helpers, which
    lived in the cluster's namespaces), root-namespace links with its prefix."""
    assert not Path(record["state"]).exists(), f"{record['state']} is left"
    alive = [pid for pid, start in record["pids"] if proc.running(pid, start)]
    assert not alive, f"speaker processes left: {alive}"
    prefix = record["prefix"]
    left = [n for n in os.listdir("/sys/class/net") if n.startswith(prefix) and not n[len(prefix):][:1].isdigit()]
    assert not left, f"underlay links left: {left}"
