"""What the machine and a namespace's counters say around one measurement.

Throughput on veth pairs measures how much CPU a datapath burns, so every TCP measurement
also records the CPU time the whole machine spent (``/proc/stat``: user + nice + system +
irq + softirq), minus what the machine spent in a quiet second just before (the idle
baseline: other programs, other engineers' clusters), per gigabit moved: ``cpu_per_gbit``.
Steal time and the load average tell whether the machine was busy while it measured.

Per namespace, counters come from ``/proc/<pid>/net/...`` of a process living in it (the
files show the reader's *target* process's network namespace), so no program is started:
interface packets, bytes and drops (``net/dev``), TCP retransmitted segments (``net/snmp``).

:class:`Freezer` pauses (SIGSTOP) every process living in the idle clusters' namespaces
while one cluster is measured and resumes them (SIGCONT) after, always.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from . import proc

log = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK")
BUSY_OTHERS_PER_CPU = 0.2     # warn when other programs kept more than this share of the CPUs busy
BUSY_STEAL = 0.05             # ... or the hypervisor stole more than this share of CPU time


@dataclass(frozen=True)
class CpuTimes:
    """Aggregate CPU times of the machine (all CPUs), in seconds, at one instant."""

    user: float
    nice: float
    system: float
    idle: float
    iowait: float
    irq: float
    softirq: float
    steal: float
    at: float                   # time.monotonic() when read

    @property
    def busy(self) -> float:
        return self.user + self.nice + self.system + self.irq + self.softirq

    @property
    def total(self) -> float:
        return self.busy + self.idle + self.iowait + self.steal


def parse_proc_stat(text: str, at: float = 0.0) -> CpuTimes:
    """The ``cpu`` line of /proc/stat (jiffies) as seconds."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            f = [int(x) / CLK_TCK for x in line.split()[1:9]]
            f += [0.0] * (8 - len(f))
            return CpuTimes(*f, at=at)
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def cpu_times() -> CpuTimes:
    with open("/proc/stat") as f:
        return parse_proc_stat(f.read(), time.monotonic())


@dataclass(frozen=True)
class CpuDelta:
    """CPU spent by the machine between two readings."""

    busy_s: float
    softirq_s: float
    steal_s: float
    total_s: float
    wall_s: float

    @property
    def steal_fraction(self) -> float:
        return self.steal_s / self.total_s if self.total_s > 0 else 0.0

    @property
    def busy_rate(self) -> float:
        """CPU-seconds per second (0..number of CPUs)."""
        return self.busy_s / self.wall_s if self.wall_s > 0 else 0.0


def delta(a: CpuTimes, b: CpuTimes) -> CpuDelta:
    return CpuDelta(b.busy - a.busy, b.softirq - a.softirq, b.steal - a.steal,
                    b.total - a.total, b.at - a.at)


def cpu_per_gbit(during: CpuDelta, baseline_rate: float, gbit: float) -> float | None:
    """CPU-seconds the measurement cost per gigabit moved: busy time during it minus the
    baseline's busy rate over the same wall time, divided by the gigabits. None when
    nothing moved. Clamped at 0: a baseline busier than the measurement is noise."""
    if gbit <= 0:
        return None
    return max(0.0, during.busy_s - baseline_rate * during.wall_s) / gbit


def parse_per_cpu_busy(text: str) -> dict[int, float]:
    """CPU number -> busy seconds (user + nice + system + irq + softirq) from /proc/stat."""
    out = {}
    for line in text.splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *f = line.split()
            v = [int(x) / CLK_TCK for x in f[:7]] + [0.0] * (7 - len(f[:7]))
            out[int(name[3:])] = v[0] + v[1] + v[2] + v[5] + v[6]
    return out


def quietest_cpu(cpus: list[int], seconds: float = 0.5, tie: float = 0.05) -> int:
    """The CPU of ``cpus`` that was least busy over ``seconds`` (other programs' work, IRQs);
    within ``tie`` CPU-seconds per second of the lowest, the lowest-numbered one."""
    a = parse_per_cpu_busy(_read("/proc/stat"))
    time.sleep(seconds)
    b = parse_per_cpu_busy(_read("/proc/stat"))
    rate = {c: (b.get(c, 0.0) - a.get(c, 0.0)) / seconds for c in cpus}
    low = min(rate.values())
    return min(c for c in cpus if rate[c] <= low + tie)


def loadavg() -> float:
    """The 1-minute load average."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def busy_warning(others: float, steal: float, cpus: int | None = None) -> str | None:
    """A warning line when other programs were busy, else None. ``others``: the machine's busy
    CPU-seconds per second in quiet seconds with this run's clusters paused (what the rest of
    the machine used, not this run's own load, which the load average would count);
    ``steal``: the largest stolen share of CPU time during a measurement."""
    cpus = cpus or os.cpu_count() or 1
    why = []
    if others > BUSY_OTHERS_PER_CPU * cpus:
        why.append(f"other programs kept {others:.2f} of {cpus} CPUs busy")
    if steal > BUSY_STEAL:
        why.append(f"{100 * steal:.0f} % of CPU time stolen by the hypervisor")
    return ("the machine was busy (" + ", ".join(why) + "): expect wider intervals") if why else None


# ---------------------------------------------------------------- per-namespace counters

@dataclass(frozen=True)
class IfCounters:
    rx_bytes: int
    rx_packets: int
    rx_drop: int
    tx_bytes: int
    tx_packets: int
    tx_drop: int


def parse_net_dev(text: str) -> dict[str, IfCounters]:
    """Interface -> counters, from /proc/net/dev."""
    out = {}
    for line in text.splitlines()[2:]:
        if ":" not in line:
            continue
        name, rest = line.split(":", 1)
        f = [int(x) for x in rest.split()]
        out[name.strip()] = IfCounters(rx_bytes=f[0], rx_packets=f[1], rx_drop=f[3],
                                       tx_bytes=f[8], tx_packets=f[9], tx_drop=f[11])
    return out


def parse_snmp(text: str) -> dict[str, dict[str, int]]:
    """/proc/net/snmp (or netstat) -> {"Tcp": {"RetransSegs": n, ...}, ...}."""
    out: dict[str, dict[str, int]] = {}
    lines = text.splitlines()
    for head, vals in zip(lines[::2], lines[1::2]):
        proto, names = head.split(":", 1)
        _, values = vals.split(":", 1)
        try:
            out[proto] = dict(zip(names.split(), (int(v) for v in values.split())))
        except ValueError:
            continue
    return out


def _pid_of(netns_path: str) -> str:
    """'/proc/1234/ns/net' -> '1234' (the namespaces of our hosts are named by a PID)."""
    parts = netns_path.strip("/").split("/")
    if len(parts) >= 2 and parts[0] == "proc" and parts[1].isdigit():
        return parts[1]
    raise ValueError(f"{netns_path}: not a /proc/PID/ns/net path")


@dataclass(frozen=True)
class NsCounters:
    ifaces: dict[str, IfCounters]
    retrans_segs: int


def ns_counters(netns_path: str) -> NsCounters:
    pid = _pid_of(netns_path)
    with open(f"/proc/{pid}/net/dev") as f:
        ifaces = {k: v for k, v in parse_net_dev(f.read()).items() if k != "lo"}
    with open(f"/proc/{pid}/net/snmp") as f:
        retrans = parse_snmp(f.read()).get("Tcp", {}).get("RetransSegs", 0)
    return NsCounters(ifaces, retrans)


def sum_delta(a: NsCounters, b: NsCounters, field: str) -> int:
    return sum(getattr(b.ifaces[k], field) - getattr(a.ifaces[k], field) for k in b.ifaces if k in a.ifaces)


# ---------------------------------------------------------------- pausing idle clusters

def pids_in(netns_paths: Iterable[str]) -> list[int]:
    """Every process (not ours) whose network namespace is one of ``netns_paths``."""
    inodes = set()
    for path in netns_paths:
        with contextlib.suppress(OSError):
            inodes.add(os.stat(path).st_ino)
    return proc.pids_in_netns(inodes)


class Freezer:
    """Pause the processes of the clusters not being measured, resume them after.

    ``groups``: label -> the network namespace paths of that cluster (nodes, pods, routers,
    hosts). ``only(label)`` is a context manager: every other group's processes get SIGSTOP
    on entry and SIGCONT on exit (also on errors and Ctrl-C). Kernel timers (ARP, TCP) keep
    running; what stops is the daemons' own work (BGP keepalives, resync loops, shells).
    """

    def __init__(self, groups: dict[str, list[str]], enabled: bool = True):
        self.groups = groups
        self.enabled = enabled
        self.stopped: list[int] = []

    def only(self, label: str) -> "_Only":
        return _Only(self, label)

    def _stop(self, label: str) -> None:
        paths = [p for g, ps in self.groups.items() if g != label for p in ps]
        for pid in pids_in(paths):
            try:
                os.kill(pid, signal.SIGSTOP)
                self.stopped.append(pid)
            except ProcessLookupError:
                continue

    def resume(self) -> None:
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                continue
        self.stopped.clear()


class _Only:
    def __init__(self, freezer: Freezer, label: str):
        self.freezer, self.label = freezer, label

    def __enter__(self) -> Freezer:
        if self.freezer.enabled:
            try:
                self.freezer._stop(self.label)
            except BaseException:
                self.freezer.resume()
                raise
        return self.freezer

    def __exit__(self, *exc) -> None:
        self.freezer.resume()


def host_namespaces(cluster) -> list[str]:
    """The network namespace paths of a cluster's hosts (nodes, pods, routers, plain hosts)."""
    hosts: Iterator = iter([*cluster.nodes.values(), *cluster.pods.values(),
                            *cluster.routers.values(), *cluster.hosts.values()])
    return [h.netns for h in hosts]


def machine() -> dict[str, str]:
    """Kernel, CPUs and their model, for a report."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    u = os.uname()
    return {"kernel": f"{u.sysname} {u.release}", "cpus": str(os.cpu_count()), "cpu model": model,
            "load average": " ".join(_read("/proc/loadavg").split()[:3])}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
