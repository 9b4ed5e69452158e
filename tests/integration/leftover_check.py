"""What one cluster must leave behind after ``stop()``: nothing.

The machine holds other clusters too (other engineers', other test runs), which
may be alive at the same time; this checks only what *this* cluster made: its state
directory, its root-namespace links (``knl<index>...``), its bpffs mount, and the processes
holding its nodes', routers' and pods' namespaces, and its CNI server workers.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil

from k8snetlab import naming, proc, statedir


class Footprint:
    """Taken while the cluster runs; ``assert_gone()`` after it stopped."""

    def __init__(self, cluster):
        self.index = cluster.state.index
        self.state = str(cluster.state.path)
        # (name, ifindex): once the index is free, another cluster may take it and its names
        self.links = {(link["ifname"], link["index"]) for link in statedir.root_links()
                      if naming.cluster_index_of(link["ifname"]) == self.index}
        self.pids = {h.name: (h.pid, proc.start_time(h.pid))
                     for group in (cluster.nodes, cluster.routers, cluster.pods, cluster.hosts)
                     for h in group.values()}
        servers = getattr(cluster, "cni_servers", None)      # the CNI server workers (invoke exec)
        for pid in (servers.pids() if servers is not None else []):
            self.pids[f"CNI server worker {pid}"] = (pid, proc.start_time(pid))

    def problems(self) -> list[str]:
        out = []
        if os.path.exists(self.state):
            out.append(f"state directory {self.state}")
        for link in statedir.root_links():
            mark = statedir.parse_link_mark(link["alias"])
            if (link["ifname"], link["index"]) in self.links or (mark and str(mark[2]) == self.state):
                out.append(f"link {link['ifname']}")
        out += [f"mount {m}" for m in statedir.mounts() if m.startswith(self.state + "/")]
        for name, (pid, start) in self.pids.items():
            if proc.running(pid, start):   # a shell, or a pod sandbox's holder
                out.append(f"process {pid} holding {name}")
        return out

    def assert_gone(self) -> None:
        left = self.problems()
        assert not left, f"cluster knl{self.index} left: {', '.join(left)}"


@contextlib.contextmanager
def running(cluster):
    """A fixture's body: start ``cluster``, yield it, stop it, and check it left nothing."""
    cluster.start()
    footprint = Footprint(cluster)
    try:
        yield cluster
    finally:
        cluster.stop()
    footprint.assert_gone()


def private_state(root: Path) -> dict[str, str]:
    """The environment for a command whose clusters keep their state below ``root`` only."""
    return {**os.environ, "K8SNETLAB_STATE": str(root)}


def left_under(root: Path) -> list[str]:
    """What clusters run with state root ``root`` left: state directories and mounts below it,
    root-namespace links whose mark names a state directory below it, and processes whose
    environment names it (every process a cluster starts inherits its runtime's)."""
    names = {str(root), str(root.resolve())}         # as given, and as the marks spell it
    root = root.resolve()
    out = [f"state directory {d}" for d in sorted(root.glob(f"{naming.PREFIX}*"))]
    out += [f"mount {m}" for m in statedir.mounts() if m.startswith(f"{root}/")]
    for link in statedir.root_links():
        mark = statedir.parse_link_mark(link["alias"])
        if mark is not None and root in mark[2].parents:
            out.append(f"link {link['ifname']}")
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get("K8SNETLAB_STATE") in names:
                out.append(f"process {p.pid} ({' '.join(p.cmdline())[:60]})")
    return out
