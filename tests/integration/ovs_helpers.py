"""What the Open vSwitch tests share: skip reasons, a cluster file with an OVS underlay, and
what a stopped (or cleaned) OVS underlay must not leave behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from helpers import THREE_NODES, require_root_and
from k8snetlab import proc


def require_ovs() -> None:
    require_root_and("mnexec", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-ofctl", "ethtool")
    pytest.importorskip("os_ken", reason="os-ken is not installed ('sudo make deps' installs it)")


def three_nodes_on_ovs(controller: str, replicas: int = 3) -> dict[str, Any]:
    """topologies/three_nodes.yaml with its subnet on one Open vSwitch switch (one pod per node)."""
    d = yaml.safe_load(THREE_NODES.read_text())
    d["underlay"].update(switch="ovs", controller=controller)
    d["workloads"][0]["spec"]["replicas"] = replicas
    return d


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that name ``text`` (a state dir: our OVS daemons,
    controller and switch shells all do)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if text in cmd and p.info["status"] != psutil.STATUS_ZOMBIE and p.pid != os.getpid():
            out.append(f"{p.pid}: {cmd}")
    return out


def netns_alive(inode: int) -> bool:
    return any(proc.netns_inode(pid) == inode for pid in psutil.pids())


def links_named(prefix: str) -> list[str]:
    return [n for n in os.listdir("/sys/class/net") if n.startswith(prefix) and not n[len(prefix):][:1].isdigit()]


def assert_gone(state_path: Path, prefix: str, netns_inode: int) -> None:
    assert not processes_mentioning(str(state_path)), processes_mentioning(str(state_path))
    assert not state_path.exists()
    assert not links_named(prefix), links_named(prefix)
    assert not netns_alive(netns_inode), "the Open vSwitch namespace is still held by a process"
