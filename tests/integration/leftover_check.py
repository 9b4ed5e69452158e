"""What one cluster must leave behind after ``stop()``: nothing.

``cleanup.leftovers()`` looks at the whole machine, where other clusters (other test runs)
may be alive at the same time; this checks only what *this* cluster made: its state
directory, its root-namespace links (``knl<index>...``), its bpffs mount, and the processes
holding its nodes', routers' and pods' namespaces, and its CNI server workers.
"""

from __future__ import annotations

import contextlib
import os

from k8snetlab import naming, proc


class Footprint:
    """Taken while the cluster runs; ``assert_gone()`` after it stopped."""

    def __init__(self, cluster):
        self.index = cluster.state.index
        self.state = str(cluster.state.path)
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
        links = [n for n in os.listdir("/sys/class/net") if naming.cluster_index_of(n) == self.index]
        out += [f"link {n}" for n in links]
        with open("/proc/self/mountinfo") as f:
            out += [f"mount {line.split()[4]}" for line in f if line.split()[4].startswith(self.state + "/")]
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
