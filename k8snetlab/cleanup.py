"""``k8snetlab clean``: remove what testbed runs whose runtime is gone left on the machine.

Only what a dead cluster recorded in its state directory (:mod:`k8snetlab.statedir`) or
marked as its own is removed: its processes (checked against their start time, so a reused
PID is never hit) and those living in its namespaces that started after it, its mounts, and
root-namespace links whose mark names a dead owner or that it recorded by name *and* ifindex.
A link that merely matches the ``knl`` prefix is reported and left alone.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import naming, proc
from .netutil import Netns
from .statedir import LINKS, NETNS, OWNER, PIDS, links_with_prefix, owner, owner_alive, parse_link_mark, \
    prune_roots, records, root_links, state_roots, umount_below


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


def _live_records(root: Path, skip: Path) -> tuple[set[int], set[int]]:
    """Namespace inodes and PIDs recorded by the clusters that are still running.

    The kernel reuses namespace inode numbers: a dead cluster's recorded inode may name a live
    cluster's namespace by now, and what lives there is not ours to stop."""
    inodes: set[int] = set()
    pids: set[int] = set()
    if not root.is_dir():
        return inodes, pids
    for other in root.iterdir():
        if other == skip or not other.is_dir() or not owner_alive(other):
            continue
        inodes |= {r["ino"] for r in records(other, NETNS)}
        pids |= {r["pid"] for r in records(other, PIDS)}
        pids.add(owner(other)["pid"])   # its runtime: a child started a moment ago may not be recorded yet
    return inodes, pids


def clean_state_dir(path: Path, report: Report) -> None:
    """Remove everything a (dead) cluster recorded in ``path``."""
    started = list(records(path, PIDS))
    what = {rec["pid"]: rec.get("what", "") for rec in started}
    for pid in proc.stop_pids([(rec["pid"], rec.get("start", 0)) for rec in started], grace=0.2):
        report.processes.append(f"{pid} ({what[pid]})")
    live_inodes, live_pids = _live_records(path.parent, path)
    inodes = {r["ino"] for r in records(path, NETNS)} - live_inodes
    if inodes:
        # not a live cluster's, nor the child of a live runtime (its new namespace may reuse
        # the inode number of one the dead cluster recorded, before the live one records it)
        found = [pid for pid in proc.pids_in_netns(inodes, owner(path).get("created_ticks", 0))
                 if pid not in live_pids and proc.parent(pid) not in live_pids]
        names = {pid: proc.cmdline(pid)[:60] or "in a testbed namespace" for pid in found}
        for pid in proc.stop_pids([(pid, proc.start_time(pid)) for pid in found], grace=0.2):
            report.processes.append(f"{pid} ({names[pid]})")
    report.mounts += umount_below(path)
    recorded = {(r.get("name"), r.get("ifindex")) for r in records(path, LINKS)}
    doomed = []
    for link in links_with_prefix(path.name):
        mark = parse_link_mark(link["alias"])
        if mark is not None and proc.running(mark[0], mark[1]):
            continue                     # a live cluster's (an index reused by an older runtime)
        if (link["ifname"], link["index"]) in recorded or (mark is not None and mark[2] == path):
            doomed.append(link["ifname"])
    _del_links(doomed, report)
    report.clusters.append(f"{path.name} ({owner(path).get('name', '?')})")
    shutil.rmtree(path, ignore_errors=True)


def _del_links(names: list[str], report: Report) -> None:
    if not names:
        return
    with Netns(None, "the root namespace") as ns:
        for name in names:
            if ns.del_link(name):
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
            young = not (path / OWNER).exists() and time.time() - path.stat().st_mtime < 10
            if (owner_alive(path) or young) and not include_live:
                live.add(path.name)     # running, or being created right now
                continue
            clean_state_dir(path, report)
    prune_roots()
    # links whose cluster has no state dir any more (its root was removed): the mark says
    # whose they were; a link with our prefix and no mark is not known to be ours
    doomed = []
    for link in sorted(root_links(), key=lambda link: link["ifname"]):
        idx = naming.cluster_index_of(link["ifname"])
        if idx is None:
            continue
        mark = parse_link_mark(link["alias"])
        if mark is None:
            if naming.cluster_prefix(idx) not in live:   # (a live cluster may be marking it now)
                report.unowned.append(link["ifname"])
        elif not proc.running(mark[0], mark[1]):
            doomed.append(link["ifname"])
    _del_links(doomed, report)
    return report
