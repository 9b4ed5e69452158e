"""A cluster's state directory and the marks that say what a cluster owns.

Each cluster gets an index ``N`` and a directory ``<root>/knlN/`` (root ``/run/k8snetlab`` or
``$K8SNETLAB_STATE``) holding its owner (PID and start time of the runtime) and records of
the processes, namespaces and root-namespace links it made. Root-namespace links also carry
a mark, an ``ifalias`` naming the owner and the directory. :mod:`k8snetlab.cleanup` reads
both to remove what a dead cluster left, and only that.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import psutil

from . import naming, proc
from .errors import K8sNetLabError, NetlinkError
from .netutil import Netns

log = logging.getLogger(__name__)

MAX_CLUSTERS = 100
ROOTS_FILE = Path(naming.STATE_ROOT) / "roots"     # every state root in use, one path a line
LINK_MARK = "k8snetlab"                            # first word of the ifalias of our links
OWNER, PIDS, NETNS, LINKS = "owner.json", "pids.jsonl", "netns.jsonl", "links.jsonl"


def state_root() -> Path:
    """Where this process puts the state of the clusters it starts."""
    return Path(os.environ.get("K8SNETLAB_STATE", naming.STATE_ROOT))


def _read_roots() -> list[Path]:
    try:
        lines = ROOTS_FILE.read_text().splitlines()
    except OSError:
        return []
    return [Path(x) for x in dict.fromkeys(line.strip() for line in lines) if x]


def state_roots() -> list[Path]:
    """Every state root in use: the default, ``$K8SNETLAB_STATE``, and those registered."""
    roots = [Path(naming.STATE_ROOT), state_root(), *_read_roots()]
    return [r for r in dict.fromkeys(roots) if r.is_dir()]


def _register_root(root: Path) -> None:
    """Add ``root`` to :data:`ROOTS_FILE` (the caller holds the registry lock)."""
    root = root.resolve()
    if root == Path(naming.STATE_ROOT) or root in _read_roots():
        return
    with open(ROOTS_FILE, "a") as f:
        f.write(f"{root}\n")


def prune_roots() -> None:
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


# -- what a state directory says ---------------------------------------------------------------
def owner(path: Path) -> dict[str, Any]:
    """The owner record of the cluster in ``path`` (``pid``, ``start``, ``name``...); {} if none."""
    try:
        found = json.loads((path / OWNER).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def owner_alive(path: Path) -> bool:
    """Does the runtime that made the cluster in ``path`` still run?"""
    rec = owner(path)
    return "pid" in rec and proc.running(rec["pid"], rec.get("start", 0))


def records(path: Path, kind: str) -> Iterator[dict[str, Any]]:
    """The records of one kind (:data:`PIDS`, :data:`NETNS`, :data:`LINKS`) in ``path``."""
    try:
        lines = (path / kind).read_text().splitlines()
    except OSError:
        return
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:
            continue


# -- link marks ---------------------------------------------------------------------------------
def link_mark(pid: int, start: int, path: Path) -> str:
    """The ``ifalias`` of a root-namespace link made by the cluster of owner ``pid``/``start``
    whose state is in ``path``."""
    return f"{LINK_MARK} {pid} {start} {path}"


def parse_link_mark(alias: str) -> tuple[int, int, Path] | None:
    """(owner pid, owner start, state dir) of a mark made by :func:`link_mark`, or None."""
    parts = (alias or "").strip().split(" ", 3)
    if len(parts) != 4 or parts[0] != LINK_MARK or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[1]), int(parts[2]), Path(parts[3])


def root_links() -> list[dict[str, Any]]:
    """Every link of the root namespace with its ``ifname``, ``index`` and ``alias``."""
    with Netns(None, "the root namespace") as ns:
        return ns.links()


def links_with_prefix(prefix: str, links: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Root-namespace links named <prefix> followed by a non-digit (knl1 must not match knl12)."""
    return [link for link in (root_links() if links is None else links)
            if link["ifname"].startswith(prefix) and not link["ifname"][len(prefix):len(prefix) + 1].isdigit()]


# -- mounts -------------------------------------------------------------------------------------
def mounts() -> list[str]:
    """Every mount point of this mount namespace."""
    return [p.mountpoint for p in psutil.disk_partitions(all=True)]


def umount_below(path: Path) -> list[str]:
    """Unmount (lazily) everything mounted at or below ``path``; return what went."""
    gone = []
    for m in sorted(mounts(), key=len, reverse=True):
        if m == str(path) or m.startswith(str(path) + "/"):
            if proc.run(["umount", "-l", m], check=False).returncode == 0:
                gone.append(m)
    return gone


class StateDir:
    """The state directory of one cluster (created by :meth:`create`)."""

    def __init__(self, index: int, path: Path):
        self.index, self.path = index, path
        self.prefix = naming.cluster_prefix(index)
        self._bpffs_mounted = False

    @classmethod
    def create(cls, name: str) -> "StateDir":
        """Claim the first free index (free in every state root and among the links) for a
        cluster named ``name`` owned by this process."""
        root = state_root()
        root.mkdir(parents=True, exist_ok=True)
        root = root.resolve()
        default = Path(naming.STATE_ROOT)
        # one lock for every root: a cluster index is unique across all of them
        try:
            default.mkdir(parents=True, exist_ok=True)
            lock = open(default / ".roots.lock", "w")
        except OSError:     # cannot use the registry (not root?): this root on its own
            lock = open(root / ".lock", "w")
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                _register_root(root)
            except OSError as e:
                log.warning("cannot register state root %s in %s: %s", root, ROOTS_FILE, e)
            roots = list(dict.fromkeys([root, *state_roots()]))
            links = root_links()
            for i in range(1, MAX_CLUSTERS):
                prefix = naming.cluster_prefix(i)
                if any((r / prefix).exists() for r in roots) or links_with_prefix(prefix, links):
                    continue
                path = root / prefix
                try:
                    path.mkdir()        # the claim itself: a runtime that could not take the
                except FileExistsError:  # registry lock holds only its own root's
                    continue
                st = cls(i, path)
                me = os.getpid()
                st._write(OWNER, {"pid": me, "start": proc.start_time(me), "name": name,
                                  "created": time.time(), "created_ticks": proc.boot_ticks_now()})
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
        self._append(PIDS, {"pid": pid, "start": proc.start_time(pid), "what": what})

    def record_netns(self, pid: int, what: str) -> None:
        ino = proc.netns_inode(pid)
        if ino is not None:
            self._append(NETNS, {"ino": ino, "what": what})

    def mark_links(self, names: list[str]) -> list[str]:
        """Mark root-namespace links this cluster just made as its own (an ``ifalias`` naming
        the owner and this state dir) and record their name and ifindex; links already marked
        are skipped, names that do not exist (yet) too. Returns the names marked now."""
        rec = owner(self.path)
        mark = link_mark(rec["pid"], rec["start"], self.path)
        done = []
        with Netns(None, "the root namespace") as ns:
            for name in names:
                if not name.startswith(self.prefix):
                    continue
                link = ns.link(name)
                if link is None or link["alias"] == mark:
                    continue        # not there (yet): a later call marks it
                try:
                    ns.set_alias(link["index"], mark)
                except NetlinkError:
                    continue        # gone again: not ours to record
                self._append(LINKS, {"name": name, "ifindex": link["index"]})
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
        umount_below(self.path)
        shutil.rmtree(self.path, ignore_errors=True)
