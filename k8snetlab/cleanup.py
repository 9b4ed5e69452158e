"""What the testbed leaves on the machine, and how it takes it all back.

Each cluster gets an index ``N`` and a state directory ``/run/k8snetlab/knlN/``: its owner
(PID and start time of the runtime), the PIDs it started (shells of the nodes and pods,
containers, daemons), the namespaces it made (inode numbers), its CNI bin dir, IPAM state and
result cache, and a private bpffs mount. Root-namespace interfaces (the underlay bridges and
their ports) are named ``knlN...``. Nothing else is touched: :func:`clean` removes only state
dirs whose owner is dead, processes recorded there (checked against their start time, so a
reused PID is never hit) or living in a recorded namespace and started after the cluster,
and root-namespace links whose name carries the prefix of a dead or unknown cluster.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import naming, proc
from .errors import K8sNetLabError

log = logging.getLogger(__name__)

MAX_CLUSTERS = 100


def _state_root() -> Path:
    return Path(os.environ.get("K8SNETLAB_STATE", naming.STATE_ROOT))


def _boot_ticks_now() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


class StateDir:
    """The state directory of one cluster (created by :meth:`create`)."""

    def __init__(self, index: int, path: Path):
        self.index, self.path = index, path
        self.prefix = naming.cluster_prefix(index)
        self._bpffs_mounted = False

    @classmethod
    def create(cls, name: str) -> "StateDir":
        root = _state_root()
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for i in range(1, MAX_CLUSTERS):
                path = root / naming.cluster_prefix(i)
                if path.exists() or _links_with_prefix(naming.cluster_prefix(i)):
                    continue
                path.mkdir()
                st = cls(i, path)
                st._write("owner.json", {"pid": os.getpid(), "start": proc.start_time(os.getpid()),
                                         "name": name, "created": time.time(),
                                         "created_ticks": _boot_ticks_now()})
                return st
        raise K8sNetLabError(f"{MAX_CLUSTERS - 1} clusters are registered in {root}: "
                             "run 'k8snetlab clean' to remove those of dead runs")

    # -- records ------------------------------------------------------------------------------
    def _write(self, name: str, obj: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(obj))
        tmp.replace(self.path / name)

    def _append(self, name: str, obj: Any) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(obj) + "\n")

    def record_pid(self, pid: int, what: str) -> None:
        self._append("pids.jsonl", {"pid": pid, "start": proc.start_time(pid), "what": what})

    def record_netns(self, pid: int, what: str) -> None:
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return
        self._append("netns.jsonl", {"ino": ino, "what": what})

    @property
    def cni_bin(self) -> Path:
        return self.path / "cni" / "bin"

    @property
    def bpf_dir(self) -> Path:
        return self.path / "bpf"

    def node_dir(self, node: str) -> Path:
        d = self.path / "nodes" / node
        d.mkdir(parents=True, exist_ok=True)
        return d

    def mount_bpffs(self) -> None:
        if not self._bpffs_mounted:
            from .ebpf import mount_bpffs
            mount_bpffs(str(self.bpf_dir))
            self._bpffs_mounted = True

    def remove(self) -> None:
        """Final step of a clean stop: unmount, delete the directory."""
        _umount_below(self.path)
        shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------------------------------
@dataclass
class Report:
    clusters: list[str] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.clusters or self.processes or self.links or self.mounts)

    def lines(self) -> list[str]:
        out = []
        for label, items in (("cluster state", self.clusters), ("process", self.processes),
                             ("interface", self.links), ("mount", self.mounts)):
            out += [f"{label}: {x}" for x in items]
        return out


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    try:
        for line in path.read_text().splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue
    except OSError:
        return


def _owner_alive(path: Path) -> bool:
    try:
        owner = json.loads((path / "owner.json").read_text())
    except (OSError, ValueError):
        return False
    return proc.running(owner["pid"], owner["start"])


def _links_with_prefix(prefix: str) -> list[str]:
    """Root-namespace links named <prefix> followed by a non-digit (knl1 must not match knl12)."""
    out = []
    for name in os.listdir("/sys/class/net"):
        if name.startswith(prefix) and not name[len(prefix):len(prefix) + 1].isdigit():
            out.append(name)
    return out


def _mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f]


def _umount_below(path: Path) -> list[str]:
    gone = []
    for m in sorted(_mounts(), key=len, reverse=True):
        if m == str(path) or m.startswith(str(path) + "/"):
            res = proc.run(["umount", "-l", m], check=False)
            if res.returncode == 0:
                gone.append(m)
    return gone


def kill_pid(pid: int, start: int, grace: float = 1.0) -> bool:
    """SIGTERM then SIGKILL one process we started (only if its start time still matches)."""
    if not start or not proc.running(pid, start):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not proc.running(pid, start):
            return True
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def processes_in_netns(inodes: set[int], started_after: int = 0) -> list[int]:
    """PIDs whose network namespace is one of ``inodes`` (and started after a tick count)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        if ino in inodes and pid != os.getpid() and proc.start_time(pid) >= started_after:
            pids.append(pid)
    return pids


def _live_records(root: Path, skip: Path) -> tuple[set[int], set[int]]:
    """Namespace inodes and PIDs recorded by the clusters that are still running.

    The kernel reuses namespace inode numbers: a dead cluster's recorded inode may name a live
    cluster's namespace by now, and what lives there is not ours to stop."""
    inodes: set[int] = set()
    pids: set[int] = set()
    if not root.is_dir():
        return inodes, pids
    for other in root.iterdir():
        if other == skip or not other.is_dir() or not _owner_alive(other):
            continue
        inodes |= {r["ino"] for r in _read_jsonl(other / "netns.jsonl")}
        pids |= {r["pid"] for r in _read_jsonl(other / "pids.jsonl")}
        try:   # its runtime: a child it started a moment ago may not be recorded yet
            pids.add(json.loads((other / "owner.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pass
    return inodes, pids


def clean_state_dir(path: Path, report: Report) -> None:
    """Remove everything a (dead) cluster recorded in ``path``."""
    try:
        owner = json.loads((path / "owner.json").read_text())
    except (OSError, ValueError):
        owner = {}
    records = list(_read_jsonl(path / "pids.jsonl"))
    what = {rec["pid"]: rec.get("what", "") for rec in records}
    for pid in kill_pids([(rec["pid"], rec.get("start", 0)) for rec in records], grace=0.2):
        report.processes.append(f"{pid} ({what[pid]})")
    live_inodes, live_pids = _live_records(path.parent, path)
    inodes = {r["ino"] for r in _read_jsonl(path / "netns.jsonl")} - live_inodes
    if inodes:
        # not a live cluster's, nor the child of a live runtime (its new namespace may reuse
        # the inode number of one the dead cluster recorded, before the live one records it)
        found = [pid for pid in processes_in_netns(inodes, owner.get("created_ticks", 0))
                 if pid not in live_pids and proc.parent(pid) not in live_pids]
        names = {pid: proc.cmdline(pid)[:60] or "in a testbed namespace" for pid in found}
        for pid in kill_pids([(pid, proc.start_time(pid)) for pid in found], grace=0.2):
            report.processes.append(f"{pid} ({names[pid]})")
    report.mounts += _umount_below(path)
    prefix = path.name
    for link in _links_with_prefix(prefix):
        if proc.run(["ip", "link", "del", link], check=False).returncode == 0:
            report.links.append(link)
    shutil.rmtree(path, ignore_errors=True)
    report.clusters.append(f"{path.name} ({owner.get('name', '?')})")


def clean(include_live: bool = False) -> Report:
    """Remove leftovers of testbed runs whose runtime is gone (``k8snetlab clean``)."""
    report = Report()
    root = _state_root()
    live = set()
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if not path.is_dir() or naming.cluster_index_of(path.name) is None:
                continue
            young = not (path / "owner.json").exists() and time.time() - path.stat().st_mtime < 10
            if (_owner_alive(path) or young) and not include_live:
                live.add(path.name)     # running, or being created right now
                continue
            clean_state_dir(path, report)
    # links of clusters that have no state dir at all (killed before it was written)
    for name in os.listdir("/sys/class/net"):
        idx = naming.cluster_index_of(name)
        if idx is None:
            continue
        prefix = naming.cluster_prefix(idx)
        if prefix in live or (root / prefix).is_dir() and _owner_alive(root / prefix):
            continue   # (a cluster that started while we were cleaning)
        if proc.run(["ip", "link", "del", name], check=False).returncode == 0:
            report.links.append(name)
    return report


def leftovers() -> Report:
    """What the testbed has on the machine right now (for tests: should be empty)."""
    report = Report()
    root = _state_root()
    others: set[str] = set()     # clusters another live process runs: not leftovers of ours
    if root.is_dir():
        for p in root.iterdir():
            if not p.is_dir():
                continue
            if _owned_by_other_live_process(p):
                others.add(p.name)
            else:
                report.clusters.append(p.name)
    report.links = [n for n in os.listdir("/sys/class/net") if naming.cluster_index_of(n) is not None
                    and naming.cluster_prefix(naming.cluster_index_of(n)) not in others]
    report.mounts = [m for m in _mounts() if m.startswith(str(root) + "/")
                     and Path(m).relative_to(root).parts[0] not in others]
    return report


def _owned_by_other_live_process(path: Path) -> bool:
    """A cluster another running process owns (several people share one machine)."""
    try:
        owner = json.loads((path / "owner.json").read_text())
    except (OSError, ValueError):
        return False
    return owner.get("pid") != os.getpid() and _owner_alive(path)


def kill_pids(pids: list[tuple[int, int]], grace: float = 1.0) -> list[int]:
    """SIGTERM many processes we started (pid, start time) at once, wait up to ``grace`` for
    all of them together, SIGKILL the rest; return the PIDs that were running. One process
    ignoring SIGTERM (an interactive shell) costs ``grace`` once, not once per process."""
    alive = [(pid, start) for pid, start in pids if start and proc.running(pid, start)]
    for pid, _ in alive:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    left = alive
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [(pid, start) for pid, start in left if proc.running(pid, start)]
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [pid for pid, _ in alive]
