"""What the testbed leaves on the machine, and how it takes it all back.

Each cluster gets an index ``N`` and a state directory ``<root>/knlN/`` (root
``/run/k8snetlab``, or ``$K8SNETLAB_STATE``): its owner (PID and start time of the runtime),
the PIDs it started (shells of the nodes and pods, containers, daemons), the namespaces it
made (inode numbers), the root-namespace links it made (name and ifindex), its CNI bin dir,
IPAM state and result cache, and a private bpffs mount. Every state root in use is listed in
one fixed place, :data:`ROOTS_FILE`, so that a plain ``clean`` sees clusters of every root and
indexes are unique across roots.

Root-namespace interfaces (the underlay bridges and their ports) are named ``knlN...`` and
carry a mark a stranger's link cannot: an ``ifalias`` ``k8snetlab <owner pid> <owner start>
<state dir>``, set when they are created. :func:`clean` removes only what a dead cluster
recorded: state dirs whose owner is dead, processes recorded there (checked against their
start time, so a reused PID is never hit) or living in a recorded namespace and started after
the cluster, links whose mark names a dead owner or that the dead cluster recorded by name
*and* ifindex. A link that merely matches the prefix is reported and left alone.
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
ROOTS_FILE = Path(naming.STATE_ROOT) / "roots"     # every state root in use, one path a line
LINK_MARK = "k8snetlab"                            # first word of the ifalias of our links


def _state_root() -> Path:
    return Path(os.environ.get("K8SNETLAB_STATE", naming.STATE_ROOT))


def _read_roots() -> list[Path]:
    try:
        lines = ROOTS_FILE.read_text().splitlines()
    except OSError:
        return []
    return [Path(x) for x in dict.fromkeys(line.strip() for line in lines) if x]


def state_roots() -> list[Path]:
    """Every state root in use: the default, ``$K8SNETLAB_STATE``, and those registered."""
    roots = [Path(naming.STATE_ROOT), _state_root(), *_read_roots()]
    return [r for r in dict.fromkeys(roots) if r.is_dir()]


def _register_root(root: Path) -> None:
    """Add ``root`` to :data:`ROOTS_FILE` (the caller holds the registry lock)."""
    root = root.resolve()
    if root == Path(naming.STATE_ROOT) or root in _read_roots():
        return
    with open(ROOTS_FILE, "a") as f:
        f.write(f"{root}\n")


def _prune_roots() -> None:
    """Forget registered roots that no longer exist (their clusters are gone with them)."""
    try:
        with open(ROOTS_FILE.with_name(".roots.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keep = [r for r in _read_roots() if r.is_dir()]
            tmp = ROOTS_FILE.with_name(".roots.tmp")
            tmp.write_text("".join(f"{r}\n" for r in keep))
            tmp.replace(ROOTS_FILE)
    except OSError as e:
        log.debug("cannot prune %s: %s", ROOTS_FILE, e)


def link_mark(pid: int, start: int, path: Path) -> str:
    return f"{LINK_MARK} {pid} {start} {path}"


def parse_link_mark(alias: str) -> tuple[int, int, Path] | None:
    """(owner pid, owner start, state dir) of a mark made by :func:`link_mark`, or None."""
    parts = alias.strip().split(" ", 3)
    if len(parts) != 4 or parts[0] != LINK_MARK or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[1]), int(parts[2]), Path(parts[3])


def _ifalias(name: str) -> str:
    try:
        return Path(f"/sys/class/net/{name}/ifalias").read_text().strip()
    except OSError:
        return ""


def _ifindex(name: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{name}/ifindex").read_text())
    except (OSError, ValueError):
        return 0


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
        root = root.resolve()
        default = Path(naming.STATE_ROOT)
        # one lock for every root: a cluster index is unique across all of them
        try:
            default.mkdir(parents=True, exist_ok=True)
            lock_path = default / ".roots.lock"
            lock = open(lock_path, "w")
        except OSError:     # cannot use the registry (not root?): this root on its own
            lock = open(root / ".lock", "w")
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                _register_root(root)
            except OSError as e:
                log.warning("cannot register state root %s in %s: %s", root, ROOTS_FILE, e)
            roots = list(dict.fromkeys([root, *state_roots()]))
            for i in range(1, MAX_CLUSTERS):
                prefix = naming.cluster_prefix(i)
                if any((r / prefix).exists() for r in roots) or _links_with_prefix(prefix):
                    continue
                path = root / prefix
                try:
                    path.mkdir()        # the claim itself (a runtime of before the registry
                except FileExistsError:  # locks only its own root)
                    continue
                st = cls(i, path)
                st._write("owner.json", {"pid": os.getpid(), "start": proc.start_time(os.getpid()),
                                         "name": name, "created": time.time(),
                                         "created_ticks": _boot_ticks_now()})
                return st
        raise K8sNetLabError(f"{MAX_CLUSTERS - 1} clusters are registered in {', '.join(map(str, roots))}: "
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

    def mark_links(self, names: list[str]) -> list[str]:
        """Mark root-namespace links this cluster just made as its own (an ``ifalias`` naming
        the owner and this state dir) and record their name and ifindex; links already marked
        are skipped, names that do not exist (yet) too. Returns the names marked now."""
        owner = json.loads((self.path / "owner.json").read_text())
        mark = link_mark(owner["pid"], owner["start"], self.path)
        done = []
        for name in names:
            if not name.startswith(self.prefix) or _ifalias(name) == mark:
                continue
            try:
                Path(f"/sys/class/net/{name}/ifalias").write_text(mark + "\n")
            except OSError:
                continue        # not there (yet): a later call marks it
            self._append("links.jsonl", {"name": name, "ifindex": _ifindex(name)})
            done.append(name)
        return done

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
    # links that look like ours (knl prefix) but carry no mark of a dead cluster: left alone
    unowned: list[str] = field(default_factory=list)

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
    recorded = {(r.get("name"), r.get("ifindex")) for r in _read_jsonl(path / "links.jsonl")}
    for link in _links_with_prefix(path.name):
        mark = parse_link_mark(_ifalias(link))
        if mark is not None and proc.running(mark[0], mark[1]):
            continue                     # a live cluster's (an index reused by an older runtime)
        if (link, _ifindex(link)) in recorded or (mark is not None and mark[2] == path):
            _del_link(link, report)
    shutil.rmtree(path, ignore_errors=True)
    report.clusters.append(f"{path.name} ({owner.get('name', '?')})")


def _del_link(name: str, report: Report) -> None:
    if proc.run(["ip", "link", "del", name], check=False).returncode == 0:
        report.links.append(name)


def clean(include_live: bool = False) -> Report:
    """Remove leftovers of testbed runs whose runtime is gone (``k8snetlab clean``), in every
    state root in use; report links that only look like ours."""
    report = Report()
    live: set[str] = set()
    for root in state_roots():
        for path in sorted(root.iterdir()):
            if not path.is_dir() or naming.cluster_index_of(path.name) is None:
                continue
            young = not (path / "owner.json").exists() and time.time() - path.stat().st_mtime < 10
            if (_owner_alive(path) or young) and not include_live:
                live.add(path.name)     # running, or being created right now
                continue
            clean_state_dir(path, report)
    _prune_roots()
    # links whose cluster has no state dir any more (its root was removed): the mark says
    # whose they were; a link with our prefix and no mark is not known to be ours
    for name in sorted(os.listdir("/sys/class/net")):
        idx = naming.cluster_index_of(name)
        if idx is None:
            continue
        mark = parse_link_mark(_ifalias(name))
        if mark is None:
            if naming.cluster_prefix(idx) not in live:   # (a live cluster may be marking it now)
                report.unowned.append(name)
        elif not proc.running(mark[0], mark[1]):
            _del_link(name, report)
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
