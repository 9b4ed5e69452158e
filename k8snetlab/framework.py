"""One experiment framework: an experiment says *what* to compare, this module runs it.

An experiment (a subclass of :class:`Experiment`) declares its variants (one cluster each: a
CNI mode with options), the scenarios measured in each (pairs of endpoints), what one
measurement yields (by default RTT percentiles from ping and TCP throughput from iperf3 with
its golden signals), the comparisons it reports (ratios of two variants, paired by round)
and its targets; :func:`run` does the rest.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv as csvmod
import logging
import math
import os
import random
import resource
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

from . import experiment_script, hoststat, measure, results, spec, stats
from .errors import SpecError

log = logging.getLogger(__name__)

DEFAULT_MAX_REPEAT = 8
SUMMARY_COLUMNS = ["run_id", "experiment", "kind", "mode", "baseline", "scenario", "metric", "unit",
                   "n", "median", "mean", "sd", "ci_low", "ci_high", "method"]


# ---------------------------------------------------------------- what an experiment declares

@dataclass(frozen=True)
class Variant:
    """One cluster of the comparison: the CSV's mode column, a CNI type, its options."""

    label: str
    cni: str
    options: dict[str, Any] = field(default_factory=dict)
    what: str = ""


@dataclass(frozen=True)
class Comparison:
    """``metric`` of ``num`` in ``scenario`` over that of ``den`` (in ``den_scenario``, by
    default the same scenario), paired by round. A headline comparison drives adaptive
    rounds. ``limit``: what the ratio can be at best (a header-overhead limit), printed beside."""

    num: str
    den: str
    scenario: str
    metric: str = "tcp_throughput"
    den_scenario: str | None = None
    headline: bool = False
    name: str = ""
    limit: float | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.den_scenario and self.den_scenario != self.scenario:
            return f"{self.num} {self.scenario} / {self.den_scenario}"
        return f"{self.num} / {self.den}"


@dataclass(frozen=True)
class Target:
    """A target line: a comparison's ratio (``kind="ratio"``), its paired difference
    num - den times ``scale`` (``"difference"``), or one mode's value (``"value"``, ``num`` is
    the mode) within [low, high]. ``possible``: what physics allows; an interval entirely
    outside it is flagged as noise, not reported as a finding."""

    what: str
    kind: str
    num: str
    den: str = ""
    scenario: str = ""
    metric: str = "tcp_throughput"
    den_scenario: str | None = None
    low: float | None = None
    high: float | None = None
    scale: float = 1.0
    possible: tuple[float | None, float | None] = (None, None)


@dataclass(frozen=True)
class Path2:
    """A scenario: traffic from ``src`` to ``dst`` (endpoints with a namespace and address)."""

    name: str
    src: experiment_script.Endpoint
    dst: experiment_script.Endpoint
    mtu: int | None = None
    connect_ip: str | None = None      # e.g. a ClusterIP in front of dst


class Experiment:
    """Subclass and fill in: ``name``, ``variants``, ``comparisons``, ``targets``; override
    ``scenarios`` (default: node-to-node, pod-same-node, pod-cross-node) and, for more than
    ping and iperf3, ``measure``."""

    name = "experiment"
    description = ""
    variants: Sequence[Variant] = ()
    comparisons: Sequence[Comparison] = ()
    targets: Sequence[Target] = ()
    table_ratios: Sequence[tuple[str, str]] = ()    # (num, den) ratio columns of the main table
    table_metrics: Sequence[str] | None = None      # None: every metric
    plot_metrics: Sequence[str] = ("rtt_p50", "tcp_throughput", "cpu_per_gbit")
    default_repeat = 3
    default_ci: float | None = None
    default_max_repeat = DEFAULT_MAX_REPEAT
    tools: Sequence[str] = ("ping", "iperf3")
    may_skip = False          # a variant this machine cannot start is skipped with its reason

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}

    def targets_for(self, link_rate: str | None) -> Sequence[Target]:
        """The targets of this run (some apply only on shaped links)."""
        return self.targets

    # -- options
    def add_options(self, p: argparse.ArgumentParser) -> None:
        """Extra options of this experiment."""

    def check_options(self, args: argparse.Namespace) -> None:
        """Validate extra options (raise SpecError)."""

    # -- clusters
    def specs(self, args: argparse.Namespace, base: Any) -> list[tuple[Variant, Any]]:
        """(variant, cluster spec) per variant; default: the base spec with the variant's CNI."""
        out = []
        for v in self.variants:
            section = {**base.cni.sections.get(v.cni, {}), **v.options}
            out.append((v, spec.with_cni(base, v.cni, **({v.cni: section} if section else {}))))
        return out

    def setup(self, run: "Run", variant: Variant, cluster: Any) -> None:
        """After a cluster is up (add probe pods, ...)."""

    def scenarios(self, run: "Run", variant: Variant, cluster: Any) -> list[Path2]:
        pod_mtu = getattr(cluster.mode, "mtu", None)
        out = []
        for sc in experiment_script.standard_scenarios(cluster):
            out.append(Path2(sc.name, sc.src, sc.dst, 1500 if sc.name == "node-to-node" else pod_mtu))
        return out

    def once(self, run: "Run", clusters: dict[str, Any]) -> None:
        """One-off measurements before the rounds (wire captures, ...)."""

    # -- one measurement
    def measure(self, run: "Run", variant: Variant, cluster: Any, path: Path2,
                duration_s: float, warmup: bool = False) -> list[tuple[str, float, str]]:
        return run.ping_and_tcp(path, duration_s)

    def extra_summary(self, run: "Run", rows: list[results.Row]) -> list[str]:
        return []


# ---------------------------------------------------------------- options

def parser(exp: Experiment) -> argparse.ArgumentParser:
    p = experiment_script.parser(exp.description or exp.name, default_repeat=exp.default_repeat)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 run (default %(default)s)")
    p.add_argument("--omit", type=float, default=1.0,
                   help="seconds of TCP ramp-up iperf3 leaves out (-O; default %(default)s)")
    p.add_argument("--pings", type=int, default=200, help="ping samples per measurement (default %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the shuffled order and the bootstrap (default: a new one, printed)")
    p.add_argument("--ci", type=float, default=exp.default_ci, metavar="PCT",
                   help="add rounds until every headline ratio's 95%% interval is within PCT %% "
                        "(default %(default)s)")
    p.add_argument("--max-repeat", type=int, default=exp.default_max_repeat,
                   help="most rounds --ci may run (default %(default)s)")
    p.add_argument("--rate", default=None, metavar="RATE",
                   help="iperf3 at a fixed rate (-b, e.g. 5G): CPU cost at equal throughput")
    p.add_argument("--link-rate", default=None, metavar="RATE",
                   help="shape every underlay link to RATE (e.g. 1gbit): goodput against the header-overhead limit")
    p.add_argument("--no-pause", action="store_true",
                   help="leave the other clusters' processes running while one measures")
    exp.add_options(p)
    return p


def check_args(exp: Experiment, args: argparse.Namespace) -> None:
    if args.quick:
        args.repeat, args.duration, args.pings, args.omit, args.ci = 1, 2.0, 50, 0.0, None
    if args.pings < 50:
        raise SpecError("--pings: at least 50 samples are needed for p99")
    if args.duration <= 0 or args.omit < 0:
        raise SpecError("--duration must be positive and --omit not negative")
    if args.ci is not None and not 0 < args.ci < 100:
        raise SpecError(f"--ci {args.ci:g}: give a percentage between 0 and 100, e.g. --ci 3")
    if args.max_repeat < args.repeat:
        args.max_repeat = args.repeat
    if args.rate is not None:
        from .shaping import parse_rate
        parse_rate(args.rate, "--rate")
    if args.link_rate is not None:
        from .shaping import parse_rate
        parse_rate(args.link_rate, "--link-rate")
    exp.check_options(args)


# ---------------------------------------------------------------- one run

class Run:
    """The state of one run: options, output files, the seeded generator, the rows."""

    def __init__(self, exp: Experiment, args: argparse.Namespace, base: Any):
        self.exp, self.args, self.base = exp, args, base
        self.seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 31)
        self.rng = random.Random(self.seed)
        self.out_dir, self.run_id, self.csv_path = experiment_script.output(args, exp.name)
        self.kernel = results.kernel_release()
        self.meta: dict[str, tuple[str, str]] = {}       # label -> (topology, datapath)
        self.writer: results.CsvWriter | None = None
        self.freezer: hoststat.Freezer | None = None
        self.baseline_rate = 0.0
        self.last_steal: float | None = None              # steal share during the last TCP test
        self.notes: list[str] = []
        self.loads: list[float] = []
        self.steals: list[float] = []
        self.shaped_by: dict[str, list[tuple[str | None, str]]] = {}   # label -> shaped (netns, device)
        self.current = ""                                  # the label being measured
        self.command = command_line()
        self.machine_start = hoststat.machine()
        self.placement = getattr(args, "placement", None) or measure.current_placement()
        self.pin = pin_label(self.placement)
        self.lean = False                                  # an adaptive round: TCP only, no ping
        self.drops: Any = None                             # drops.DropCounter while it counts
        self.drops_unavailable = ""                        # why not, if not
        self.ns_names: dict[str, dict[int, str]] = {}      # label -> netns inode -> host name
        self.drop_totals: collections.Counter = collections.Counter()   # (label, host, reason) -> drops
        self.baselines: list[float] = []

    # -- rows
    def row(self, label: str, path: Path2 | None, rnd: int, metric: str, value: float, unit: str,
            load1: float | None = None, steal: float | None = None, pin: str | None = None) -> None:
        assert self.writer is not None
        topology, datapath = self.meta.get(label, (self.base.name, ""))
        self.writer.write(results.Row(
            run_id=self.run_id, timestamp=results.utc_timestamp(), experiment=self.exp.name,
            topology=topology, mode=label, datapath=datapath,
            scenario=path.name if path else "lifecycle", src=path.src.name if path else "",
            dst=path.dst.name if path else "", round=rnd, metric=metric, value=value, unit=unit,
            mtu=path.mtu if path else None, kernel=self.kernel, load1=load1, steal=steal, pin=pin))

    # -- the default measurement: ping, then iperf3 with its golden signals
    def ping_and_tcp(self, path: Path2, duration_s: float) -> list[tuple[str, float, str]]:
        out: list[tuple[str, float, str]] = []
        if self.lean:                     # adaptive rounds measure what the headline ratios need
            return self.tcp(path, duration_s)
        target = path.connect_ip or path.dst.ip
        measure.ping(path.src.netns, target, count=3, interval_s=0.01)
        rtt = measure.ping(path.src.netns, target, count=self.args.pings, interval_s=0.01)
        out.append(("rtt_loss", rtt.loss, "fraction"))
        if rtt.samples_ms:
            out += [("rtt_min", rtt.min, "ms"), ("rtt_p50", rtt.p50, "ms"), ("rtt_p90", rtt.p90, "ms"),
                    ("rtt_p99", rtt.p99, "ms")]
        out += self.tcp(path, duration_s)
        return out

    def tcp(self, path: Path2, duration_s: float) -> list[tuple[str, float, str]]:
        """iperf3 from src to dst and what the machine and both namespaces said meanwhile."""
        got, self.last_steal = tcp_signals(path.src.netns, path.dst.netns, path.dst.ip, duration_s,
                                           omit_s=self.args.omit, connect_ip=path.connect_ip,
                                           bitrate=self.args.rate, baseline_rate=self.baseline_rate,
                                           shaped=self.shaped_by.get(self.current, []),
                                           placement=self.placement, drops=self.drops,
                                           drop_netns=self.ns_names.get(self.current))
        if self.drops is not None:
            names = self.ns_names.get(self.current, {})
            for (ns, reason), n in self.drops.last.items():
                self.drop_totals[(self.current, names.get(ns, str(ns)), reason)] += n
        return got

    def start_drops(self) -> None:
        """Count kernel drop reasons for the whole run, if this machine can (else say why)."""
        from . import drops
        from .errors import CommandError
        try:
            self.drops = drops.DropCounter().start()
        except (drops.DropsUnavailable, CommandError, OSError) as e:
            self.drops, self.drops_unavailable = None, str(e).splitlines()[0]
            log.warning("kernel drop reasons not counted: %s", self.drops_unavailable)

    def measure_baseline(self) -> None:
        """The machine's busy rate in a quiet second (every cluster paused): the CPU the
        rest of the machine spends, subtracted from each measurement's CPU time."""
        assert self.freezer is not None
        with self.freezer.only(None):
            self.baseline_rate = quiet_busy_rate()
        self.baselines.append(self.baseline_rate)


def tcp_signals(src_netns: str, dst_netns: str, dst_ip: str, duration_s: float, omit_s: float = 1.0,
                connect_ip: str | None = None, bitrate: str | None = None, baseline_rate: float = 0.0,
                shaped: Sequence[tuple[str | None, str]] = (), port: int = 5201,
                placement: measure.Placement | None = None, drops: Any = None,
                drop_netns: Collection[int] | None = None,
                ) -> tuple[list[tuple[str, float, str]], float]:
    """One iperf3 TCP test with its golden signals: throughput, retransmits, packets/s at the
    receiver, interface drops at both ends, softirq share of the busy CPU time, CPU-seconds
    per gigabit (``baseline_rate``, the machine's busy CPU-seconds per second when quiet,
    subtracted) and, on shaped links, qdisc drops and backlog. Returns the (metric, value,
    unit) triples and the share of CPU time stolen meanwhile. Any experiment may call it.

    ``drops``: a started :class:`drops.DropCounter`: the kernel's drops (``skb:kfree_skb``) in
    the namespaces ``drop_netns`` (inodes; default the two ends') during the test become
    ``kernel_drops`` (reasons that are packet loss) and ``kernel_drops_noise`` (NOT_SPECIFIED
    and what closing a socket frees: :data:`drops.NOISE`); the
    per (namespace, reason) counts are left in ``drops.last``."""
    from . import shaping
    qdisc = lambda: {(ns, dev): shaping.qdisc_counters(ns, dev) for ns, dev in shaped}
    before_src, before_dst = hoststat.ns_counters(src_netns), hoststat.ns_counters(dst_netns)
    q0 = qdisc()
    d0 = drops.snapshot() if drops is not None else None
    cpu0 = hoststat.cpu_times()
    tcp = measure.iperf3(src_netns, dst_netns, dst_ip, duration_s=duration_s, omit_s=omit_s,
                         connect_ip=connect_ip, bitrate=bitrate, port=port, placement=placement)
    cpu = hoststat.delta(cpu0, hoststat.cpu_times())
    if drops is not None:
        from . import drops as dropsmod
        where = drop_netns if drop_netns is not None else \
            {i for i in (dropsmod.netns_inode(src_netns), dropsmod.netns_inode(dst_netns)) if i}
        drops.last = dropsmod.delta(d0 or {}, drops.snapshot(), drops.names, where)
    after_src, after_dst = hoststat.ns_counters(src_netns), hoststat.ns_counters(dst_netns)
    rx_bytes = hoststat.sum_delta(before_dst, after_dst, "rx_bytes")
    rx_packets = hoststat.sum_delta(before_dst, after_dst, "rx_packets")
    if_drops = sum(hoststat.sum_delta(a, b, f) for a, b in ((before_src, after_src), (before_dst, after_dst))
                   for f in ("rx_drop", "tx_drop"))
    out = [("tcp_throughput", tcp.gbit_s, "Gbit/s"), ("tcp_retransmits", tcp.retransmits, "count"),
           ("rx_pps", rx_packets / cpu.wall_s if cpu.wall_s > 0 else 0.0, "packets/s"),
           ("if_drops", if_drops, "count"),
           ("softirq_share", cpu.softirq_s / cpu.busy_s if cpu.busy_s > 0 else 0.0, "fraction")]
    per = hoststat.cpu_per_gbit(cpu, baseline_rate, rx_bytes * 8 / 1e9)
    if per is not None:
        out.append(("cpu_per_gbit", per, "s/Gbit"))
    out.append(("cpu_baseline", baseline_rate, "cores"))
    gbit = tcp.gbit_s * tcp.duration_s
    if tcp.cpu_sender_pct is not None and tcp.cpu_receiver_pct is not None and gbit > 0:
        # the two iperf3 processes' own CPU time: robust to other load, without softirq work
        out.append(("proc_cpu_per_gbit", (tcp.cpu_sender_pct + tcp.cpu_receiver_pct) / 100 * tcp.duration_s / gbit,
                    "s/Gbit"))
    if drops is not None:
        real, noise = dropsmod.split_noise(collections.Counter({r: n for (_, r), n in drops.last.items()}))
        out += [("kernel_drops", real, "count"), ("kernel_drops_noise", noise, "count")]
    if shaped:
        q1 = qdisc()
        out.append(("qdisc_drops", sum(q1[k][0] - q0.get(k, (0, 0))[0] for k in q1), "count"))
        out.append(("qdisc_backlog", max((v[1] for v in q1.values()), default=0), "bytes"))
    return out, cpu.steal_fraction


def namespace_names(cluster: Any) -> dict[int, str]:
    """netns inode -> host name (node, pod, router, host) of a cluster."""
    out = {}
    for group in (cluster.nodes, cluster.pods, cluster.routers, cluster.hosts):
        for name, h in group.items():
            try:
                out[os.stat(h.netns).st_ino] = name
            except OSError:
                continue
    return out


def drop_lines(r: "Run", top: int = 12) -> list[str]:
    """The kernel drop reasons per mode and namespace over the run (most first)."""
    if r.drops is None:
        return [f"\nKernel drop reasons: not counted ({r.drops_unavailable or 'no counter'}); "
                "if_drops (interface counters) and tcp_retransmits still show loss."]
    if not r.drop_totals:
        return ["\nKernel drop reasons (skb:kfree_skb in the measured cluster's namespaces during the "
                "TCP tests): none."]
    from .drops import NOISE
    lines = ["\nKernel drop reasons (skb:kfree_skb in the measured cluster's namespaces during the TCP "
             f"tests, all rounds; packet loss first, then {', '.join(sorted(NOISE))}: no reason given, or "
             "the queues of a closing socket, not loss):"]
    ranked = sorted(r.drop_totals.items(), key=lambda kv: (kv[0][2] in NOISE, -kv[1], kv[0]))
    for (mode, host, reason), n in ranked[:top]:
        lines.append(f"  {mode:<18} {host:<16} {reason:<24} {n}")
    if len(ranked) > top:
        lines.append(f"  ... {len(ranked) - top} more (mode, namespace, reason) triples")
    return lines


def pin_label(p: measure.Placement) -> str:
    """The CSV's ``pin`` cell: ``same:0``, ``split:0/1`` or ``none``."""
    if p.mode == "same":
        return f"same:{p.client}"
    if p.mode == "split":
        return f"split:{p.client}/{p.server}"
    return "none"


def quiet_busy_rate(seconds: float = 1.0) -> float:
    """The machine's busy CPU-seconds per second over ``seconds`` (call it with nothing of
    ours running): the baseline :func:`tcp_signals` subtracts."""
    a = hoststat.cpu_times()
    time.sleep(seconds)
    return hoststat.delta(a, hoststat.cpu_times()).busy_rate


# ---------------------------------------------------------------- the run itself

def run(exp: Experiment, args: argparse.Namespace) -> int:
    """Run an experiment; the framework:

    1. validates every option and builds the clusters (nothing exists before the options are
       known to be good);
    2. runs a warm-up round that is not recorded (ARP, caches, TCP ramp-up of a first run);
    3. runs rounds: every (variant, scenario) once per round, in an order shuffled per round by
       a seeded generator (the seed is printed: ``--seed`` repeats the order), so neither
       drift of the shared machine nor position in the round favours a variant. While one
       cluster measures, the processes of the others are paused (SIGSTOP/SIGCONT, see
       :class:`hoststat.Freezer`); ``--no-pause`` leaves them running;
    4. adaptive rounds, as netperf's ``-I``: with ``--ci PCT`` it goes on after ``--repeat``
       rounds (measuring only what the headline comparisons need) until every headline ratio's
       95 % interval is within PCT % of the ratio, or ``--max-repeat`` is reached, and says which;
    5. writes every measurement as a row (UTC timestamps, the load average and steal time of
       the machine), then ``<name>-<run id>-summary.csv`` (n, median, mean, sd, 95 % interval
       per mode, scenario and metric; each comparison's ratio with its paired-bootstrap
       interval), prints the summary with intervals and verdicts (``met`` only when the whole
       interval is on the right side), draws the plots (means with interval error bars and a
       dot per round) and writes ``<name>-<run id>.md``, a report with the machine and the
       exact command.
    """
    from . import proc
    from .cluster import Cluster
    check_args(exp, args)
    base = experiment_script.load_topology(args)
    if args.link_rate:
        from .shaping import with_link_rate
        base = with_link_rate(base, args.link_rate)
    plan_specs = exp.specs(args, base)
    proc.require_root(exp.name)
    proc.require(*exp.tools)
    r = Run(exp, args, base)
    for label, why in exp.skipped.items():
        log.info("skipping %s: %s", label, why)
    print(f"{exp.name}: run {r.run_id}, seed {r.seed} (--seed {r.seed} repeats this order); "
          f"CPU placement: {r.placement.describe()}", file=sys.stderr)

    with contextlib.ExitStack() as stack, results.CsvWriter(r.csv_path) as writer:
        r.writer = writer
        clusters: dict[str, Any] = {}
        variants: dict[str, Variant] = {}
        from .cli import BAD_INPUT
        for v, s in plan_specs:
            t0 = time.monotonic()
            c = Cluster(s)
            stack.callback(c.stop)
            try:
                c.start()
            except BAD_INPUT as e:
                if not exp.may_skip:
                    raise
                exp.skipped[v.label] = str(e)        # this machine cannot run it: say so, go on
                log.warning("skipping %s: %s", v.label, e)
                continue
            clusters[v.label], variants[v.label] = c, v
            r.meta[v.label] = (c.spec.name, c.mode.datapath)
            exp.setup(r, v, c)
            print(f"{v.label}: cluster up in {time.monotonic() - t0:.2f} s (datapath {c.mode.datapath}, "
                  f"pod MTU {getattr(c.mode, 'mtu', '-')})", file=sys.stderr)
            r.row(v.label, None, 0, "cluster_up", c.timings["start_s"], "s")
        if not clusters:
            raise SpecError(f"{base.source}: no variant could start here: "
                            + "; ".join(f"{k}: {v}" for k, v in exp.skipped.items()))
        from .shaping import shaped_devices
        r.shaped_by = {k: shaped_devices(c) for k, c in clusters.items()}
        r.ns_names = {k: namespace_names(c) for k, c in clusters.items()}
        r.start_drops()
        if r.drops is not None:
            stack.callback(r.drops.stop)
            r.drops.watch({i for names in r.ns_names.values() for i in names})
        r.freezer = hoststat.Freezer({k: hoststat.host_namespaces(c) for k, c in clusters.items()},
                                     enabled=not args.no_pause)
        stack.callback(r.freezer.resume)
        paths = {k: exp.scenarios(r, variants[k], c) for k, c in clusters.items()}
        exp.once(r, clusters)

        full = [(k, p) for k in clusters for p in paths[k]]
        needed = {(c.num, c.scenario) for c in exp.comparisons if c.headline} | \
                 {(c.den, c.den_scenario or c.scenario) for c in exp.comparisons if c.headline}
        lean = [(k, p) for k, p in full if (k, p.name) in needed] or full

        def one_round(rnd: int, items: list[tuple[str, Path2]], progress: experiment_script.Progress | None,
                      duration: float) -> None:
            order = list(items)
            r.rng.shuffle(order)
            r.measure_baseline()
            for k, p in order:
                if progress:
                    progress.step(f"round {rnd} {k} {p.name}")
                load1 = hoststat.loadavg()
                r.last_steal, r.current = None, k
                with r.freezer.only(k):
                    got = exp.measure(r, variants[k], clusters[k], p, duration, warmup=rnd == 0)
                if rnd == 0:
                    continue
                r.loads.append(load1)
                steal = r.last_steal
                if steal is not None:
                    r.steals.append(steal)
                for metric, value, unit in got:
                    r.row(k, p, rnd, metric, value, unit, load1=load1, steal=steal, pin=r.pin)

        if not args.quick:
            print("warm-up round (not recorded)", file=sys.stderr)
            r.lean = True                 # TCP only: it warms ARP, caches and the TCP paths
            try:
                one_round(0, full, None, 1.0)
            finally:
                r.lean = False
        progress = experiment_script.Progress(args.repeat * len(full))
        rnd = 0
        for rnd in range(1, args.repeat + 1):
            one_round(rnd, full, progress, args.duration)
        stop_reason = None
        if args.ci is not None:
            while True:
                widths = headline_widths(exp, _rows_so_far(r), r.seed)
                worst = max(widths.values(), default=0.0)
                if worst <= args.ci:
                    stop_reason = (f"every headline ratio's 95 % interval is within {args.ci:g} % "
                                   f"after {rnd} rounds")
                    break
                if rnd >= args.max_repeat:
                    stop_reason = (f"--max-repeat {args.max_repeat} reached: " + "; ".join(
                        f"{name} interval +-{w:.1f} % (wanted {args.ci:g} %, missed by {w - args.ci:.1f} points)"
                        for name, w in widths.items() if w > args.ci))
                    break
                rnd += 1
                log.info("round %d: headline interval +-%.1f %% > %g %%: one more round", rnd, worst, args.ci)
                r.lean = True
                try:
                    one_round(rnd, lean, None, args.duration)
                finally:
                    r.lean = False
        r.freezer.resume()
        for k in reversed(list(clusters)):
            c = clusters.pop(k)
            c.stop()
            r.row(k, None, 0, "cluster_down", c.timings["stop_s"], "s")
        r.row("all", None, 0, "runtime_peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MB")

    rows = results.read_rows(r.csv_path)
    text = summary(exp, rows, r.seed, quick=args.quick, stop_reason=stop_reason,
                   link_rate=args.link_rate, targets=exp.targets_for(args.link_rate))
    extra = exp.extra_summary(r, rows)
    if extra:
        text += "\n" + "\n".join(extra)
    text += "\n".join(drop_lines(r))
    text += "\n\n" + machine_lines(r)

    print(text)
    summary_path = r.csv_path.with_name(r.csv_path.stem + "-summary.csv")
    write_summary(summary_path, exp, rows, r.run_id, r.seed)
    png = results.plot(rows, r.csv_path.with_suffix(".png"), metrics=exp.plot_metrics,
                       modes=[v.label for v in exp.variants if any(x.mode == v.label for x in rows)],
                       title=f"{exp.name} on {base.name}")
    md = write_report(r, text, png, summary_path)
    print(f"\nCSV: {r.csv_path}\nsummary CSV: {summary_path}\nreport: {md}")
    if png:
        print(f"plot: {png}")
    return 0


def machine_lines(r: Run) -> str:
    """What the machine did besides this run: the CPU placement, the busy CPU of the quiet
    seconds (other programs; this run's clusters paused) and a warning when it was busy."""
    lines = [f"CPU placement (--pin): {r.placement.describe()}."]
    others = stats.describe(r.baselines).median if r.baselines else None
    cpus = os.cpu_count() or 1
    if others is not None:
        lines.append(f"Busy CPU of the machine in the quiet second before each round (other programs and this "
                     f"run's idle runtime; its clusters "
                     f"{'running, --no-pause' if r.args.no_pause else 'paused'}): median {others:.2f} "
                     f"of {cpus} CPUs; load average {min(r.loads, default=0):.2f} .. {max(r.loads, default=0):.2f} "
                     "(it counts this run's own work too).")
    warn = hoststat.busy_warning(others or 0.0, max(r.steals, default=0.0), cpus)
    if warn:
        lines.append(f"WARNING: {warn} (columns cpu_baseline and steal of the CSV).")
        if others is not None and others > 0.5 * cpus:
            lines.append("  cpu_per_gbit (whole machine, baseline subtracted) means little then; "
                         "proc_cpu_per_gbit (the iperf3 processes' own time) still compares modes.")
    return "\n".join(lines)


def _rows_so_far(r: Run) -> list[results.Row]:
    return results.read_rows(r.csv_path)


def main(exp: Experiment, argv: Sequence[str] | None = None) -> int:
    return experiment_script.main(lambda a: run(exp, a), parser(exp), argv)


# ---------------------------------------------------------------- statistics of rows (pure)

def by_round(rows: Iterable[results.Row], mode: str, scenario: str, metric: str) -> dict[int, float]:
    """round -> value of one mode, scenario and metric (rounds >= 1)."""
    return {r.round: r.value for r in rows
            if r.mode == mode and r.scenario == scenario and r.metric == metric and r.round >= 1}


def paired(rows: list[results.Row], num: str, den: str, scenario: str, metric: str,
           den_scenario: str | None = None) -> tuple[list[float], list[float]]:
    a = by_round(rows, num, scenario, metric)
    b = by_round(rows, den, den_scenario or scenario, metric)
    common = sorted(set(a) & set(b))
    return [a[i] for i in common], [b[i] for i in common]


def comparison_ratio(rows: list[results.Row], c: Comparison | Target, seed: int) -> stats.Ratio | None:
    a, b = paired(rows, c.num, c.den, c.scenario, c.metric, c.den_scenario)
    if not a or sum(b) == 0:
        return None
    return stats.paired_ratio(a, b, seed=seed)


def headline_widths(exp: Experiment, rows: list[results.Row], seed: int) -> dict[str, float]:
    """Half-width in percent of each headline comparison's interval (inf with under 2 rounds).
    A comparison of a variant this run does not measure (``--modes`` left it out) has none."""
    out = {}
    measured = {r.mode for r in rows if r.round >= 1}
    for c in exp.comparisons:
        if not c.headline or c.num not in measured or c.den not in measured:
            continue
        rt = comparison_ratio(rows, c, seed)
        out[c.label] = math.inf if rt is None or rt.n < 2 else rt.half_width_pct
    return out


def target_line(rows: list[results.Row], t: Target, seed: int) -> str:
    """``  met           what: 0.93 [0.90, 0.96]`` (or MISSED, inconclusive, noise, n/a)."""
    if t.kind == "value":
        vals = [r.value for r in rows if r.mode == t.num and r.metric == t.metric
                and (not t.scenario or r.scenario == t.scenario)]
        if not vals:
            return f"  {'n/a':<13} {t.what}: not measured"
        s = stats.describe(vals)
        lo, mid, hi, n = s.ci_low * t.scale, s.mean * t.scale, s.ci_high * t.scale, s.n
    elif t.kind == "ratio":
        rt = comparison_ratio(rows, t, seed)
        if rt is None:
            return f"  {'n/a':<13} {t.what}: not measured (mode skipped or scenario absent)"
        lo, mid, hi, n = rt.ci_low, rt.value, rt.ci_high, rt.n
    elif t.kind == "difference":
        a, b = paired(rows, t.num, t.den, t.scenario, t.metric, t.den_scenario)
        if not a:
            return f"  {'n/a':<13} {t.what}: not measured"
        s = stats.paired_difference(a, b)
        lo, mid, hi, n = s.ci_low * t.scale, s.mean * t.scale, s.ci_high * t.scale, s.n
    else:
        raise ValueError(f"unknown target kind {t.kind!r}")
    shown = stats.fmt_ci(mid, lo, hi)
    if t.kind != "value" and n < 2:
        return f"  {'indicative':<13} {t.what}: {mid:.3g} (one round: no interval, no verdict)"
    if stats.impossible(lo, hi, *t.possible):
        return f"  {'noise':<13} {t.what}: {shown} is physically impossible: a disturbed measurement, not a finding"
    v = stats.verdict(lo, hi, t.low, t.high)
    return f"  {v:<13} {t.what}: {shown}"


def overhead_limits(exp: Experiment, rows: list[results.Row], scenario: str) -> dict[str, float]:
    """mode -> TCP payload per byte the link's rate limiter counts, from the pod MTU the rows
    of ``scenario`` carry and the mode's encapsulation (:func:`shaping.goodput_fraction`)."""
    from .shaping import encap_bytes, goodput_fraction
    out = {}
    for v in exp.variants:
        mtus = [r.mtu for r in rows if r.mode == v.label and r.scenario == scenario and r.mtu]
        if mtus:
            out[v.label] = goodput_fraction(mtus[0], encap_bytes(v.cni, v.options))
    return out


def link_rate_lines(exp: Experiment, rows: list[results.Row], link_rate: str, scenario: str) -> list[str]:
    """Per mode: goodput with its interval beside what the rate leaves after the headers."""
    from .shaping import parse_rate
    gbit = parse_rate(link_rate, "--link-rate") / 1e9
    lines = [f"\nGoodput on a {link_rate} underlay ({scenario}) against the header-overhead limit "
             "(TCP payload per frame the rate limiter counts: 1448 of 1514 B plain, 1428 IPIP, 1398 VXLAN):"]
    for mode, frac in overhead_limits(exp, rows, scenario).items():
        vals = [r.value for r in rows if r.mode == mode and r.scenario == scenario
                and r.metric == "tcp_throughput" and r.round >= 1]
        if not vals:
            continue
        s = stats.describe(vals)
        limit = gbit * frac
        lines.append(f"  {mode:<18} {stats.fmt_ci(s.mean, s.ci_low, s.ci_high)} Gbit/s; limit {limit:.4f} "
                     f"Gbit/s; measured/limit {s.mean / limit:.3f} [{s.ci_low / limit:.3f}, {s.ci_high / limit:.3f}]")
    return lines


def summary(exp: Experiment, rows: list[results.Row], seed: int, quick: bool = False,
            stop_reason: str | None = None, link_rate: str | None = None,
            targets: Sequence[Target] | None = None) -> str:
    """Per scenario and metric: every mode's mean [95 % CI], the table ratios with paired
    intervals; then the comparisons, the targets with verdicts, and how the run ended."""
    modes = [v.label for v in exp.variants if any(r.mode == v.label for r in rows)]
    measured = [r for r in rows if r.scenario != "lifecycle" and r.round >= 1
                and (exp.table_metrics is None or r.metric in exp.table_metrics)]
    groups: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for r in measured:
        groups.setdefault((r.scenario, r.metric, r.unit), {}).setdefault(r.mode, []).append(r.value)
    ratio_cols = [(n, d) for n, d in exp.table_ratios if n in modes and d in modes]
    headers = ["scenario", "metric", "unit", *modes, *(f"{n}/{d}" for n, d in ratio_cols)]
    body = []
    for (sc, metric, unit), per in groups.items():
        cells: list[Any] = [sc, metric, unit]
        for m in modes:
            vals = per.get(m)
            if not vals:
                cells.append("-")
                continue
            s = stats.describe(vals)
            cells.append(stats.fmt_ci(s.mean, s.ci_low, s.ci_high) if s.n > 1 else f"{s.mean:.4g}")
        for n, d in ratio_cols:
            a, b = paired(rows, n, d, sc, metric)
            if not a or sum(b) == 0:
                cells.append("-")
            else:
                rt = stats.paired_ratio(a, b, seed=seed)
                cells.append(stats.fmt_ratio(rt) if rt.n > 1 else f"{rt.value:.3g}")
        body.append(cells)
    lines = ["Mean [95 % confidence interval] over rounds; ratios: mean/mean with a paired bootstrap "
             f"interval over rounds (seed {seed})", results.format_table(headers, body)]
    targets = exp.targets if targets is None else targets
    comps = list(exp.comparisons)
    if comps:
        lines.append("\nComparisons (TCP throughput unless named):")
        for c in comps:
            if not all(any(r.scenario == sc and r.mode == m for r in rows)
                       for m, sc in ((c.num, c.scenario), (c.den, c.den_scenario or c.scenario))):
                continue                      # a mode skipped, or a scenario this topology lacks
            rt = comparison_ratio(rows, c, seed)
            a, b = paired(rows, c.num, c.den, c.scenario, c.metric, c.den_scenario)
            zero = f"no ratio: {c.den} measured 0 in every round" if a and not sum(b) else "not measured"
            shown = (zero if rt is None else f"{stats.fmt_ratio(rt)} (n={rt.n})" if rt.n > 1
                     else f"{rt.value:.3g} (one round: no interval)")
            extra = ""
            limits = overhead_limits(exp, rows, c.scenario) if link_rate else {}
            if c.metric == "tcp_throughput" and c.num in limits and c.den in limits and not c.den_scenario:
                lim = limits[c.num] / limits[c.den]
                extra = f"   header-overhead limit {lim:.3f}"
            elif c.limit is not None:
                extra = f"   limit {c.limit:.3f}"
            lines.append(f"  {'*' if c.headline else ' '} {c.label} ({c.scenario}"
                         f"{'' if c.metric == 'tcp_throughput' else ', ' + c.metric}): {shown}{extra}")
    if link_rate:
        scen = next((c.scenario for c in exp.comparisons if c.headline), "pod-cross-node")
        lines += link_rate_lines(exp, rows, link_rate, scen)
    if targets:
        lines.append("\nTargets (met: the whole interval on the right side; MISSED: all of it on the wrong "
                     "side; inconclusive: it crosses the target):")
        lines += [target_line(rows, t, seed) for t in targets]
    if exp.skipped:
        lines.append("\nSkipped:")
        lines += [f"  {k}: {v}" for k, v in exp.skipped.items()]
    if quick:
        lines.append("\n--quick: one short round; its ratios are indicative only (no interval can be computed "
                     "from one round).")
    if stop_reason:
        lines.append(f"\nAdaptive rounds: {stop_reason}.")
    return "\n".join(lines)


def summary_rows(exp: Experiment, rows: list[results.Row], run_id: str, seed: int) -> list[list[Any]]:
    out = []
    groups: dict[tuple[str, str, str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r.mode, r.scenario, r.metric, r.unit), []).append(r.value)
    for (mode, sc, metric, unit), vals in groups.items():
        s = stats.describe(vals)
        out.append([run_id, exp.name, "value", mode, "", sc, metric, unit, s.n, s.median, s.mean, s.sd,
                    s.ci_low, s.ci_high, "t"])
    for c in exp.comparisons:
        rt = comparison_ratio(rows, c, seed)
        if rt is None:
            continue
        sc = c.scenario if not c.den_scenario else f"{c.scenario}/{c.den_scenario}"
        out.append([run_id, exp.name, "ratio", c.num, c.den, sc, c.metric, "ratio", rt.n, "", rt.value, "",
                    rt.ci_low, rt.ci_high, f"paired bootstrap seed {seed}"])
    return out


def write_summary(path: Path, exp: Experiment, rows: list[results.Row], run_id: str, seed: int) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csvmod.writer(f)
        w.writerow(SUMMARY_COLUMNS)
        for line in summary_rows(exp, rows, run_id, seed):
            w.writerow(["" if c is None else repr(c) if isinstance(c, float) else c for c in line])
    return path


def write_report(r: Run, text: str, png: Path | None, summary_path: Path) -> Path:
    how = (f"Seed {r.seed}. Rounds interleaved, shuffled within each round; warm-up round discarded; "
           f"{'other clusters paused while one measures' if not r.args.no_pause else 'other clusters running'}.")
    return report_md(r.exp, r.csv_path, r.run_id, r.command, how, r.machine_start, r.loads, r.steals,
                     text, png, summary_path)


def command_line() -> str:
    """The command that started this process, as a person would type it."""
    python = os.path.basename(sys.executable) if sys.argv and sys.argv[0].endswith(".py") else ""
    return " ".join(shlex.quote(a) for a in [python, *sys.argv] if a)


def report_md(exp: Experiment, csv_path: Path, run_id: str, command: str, how: str,
              machine_start: dict[str, str], loads: Sequence[float], steals: Sequence[float], text: str,
              png: Path | None, summary_path: Path | None) -> Path:
    """``<name>-<run id>.md`` beside the CSV: the command, the machine, the summary, the plots."""
    md = csv_path.with_suffix(".md")
    m = machine_start
    end_load = " ".join(open("/proc/loadavg").read().split()[:3])
    lines = [f"# {exp.name}, run {run_id}", "",
             exp.description, "",
             "## Command", "", "```", command, "```", "",
             how,
             "", "## Machine", "",
             "| | |", "|---|---|",
             f"| kernel | {m['kernel']} |", f"| CPUs | {m['cpus']} x {m['cpu model']} |",
             f"| load average at start | {m['load average']} |", f"| load average at end | {end_load} |",
             f"| load average during measurements | "
             f"{min(loads, default=0):.2f} .. {max(loads, default=0):.2f} |",
             f"| steal time during measurements | up to {100 * max(steals, default=0):.1f} % |", "",
             "## Summary", "", "```", text, "```", ""]
    if png:
        lines += ["## Plots", "", f"![{exp.name}]({png.name})", "",
                  "Bars: mean over rounds; error bars: 95 % confidence interval; dots: the rounds.", ""]
    lines += ["## Files", "", f"- raw rows: `{csv_path.name}`"]
    if summary_path is not None:
        lines.append(f"- statistics: `{summary_path.name}`")
    md.write_text("\n".join(lines + [""]))
    return md


def provenance(started: str, how: str = "") -> list[str]:
    """Markdown lines for a report without rounds (a functional check): the exact command, when
    it started (UTC) and the machine."""
    m = hoststat.machine()
    return ["## Command", "", "```", command_line(), "```", "", f"Started {started} (UTC). {how}".rstrip(), "",
            "## Machine", "", "| | |", "|---|---|", f"| kernel | {m['kernel']} |",
            f"| CPUs | {m['cpus']} x {m['cpu model']} |", f"| load average at the end | {m['load average']} |", ""]


def write_outputs(exp: Experiment, csv_path: Path, run_id: str, text: str, png: Path | None = None,
                  seed: int = 1, how: str = "", machine_start: dict[str, str] | None = None) -> tuple[Path, Path]:
    """For an experiment that runs its own rounds: ``<name>-<run id>-summary.csv`` (n, median,
    mean, sd, 95 % interval per mode, scenario and metric; ratios of ``exp.comparisons``) and
    the report ``<name>-<run id>.md``, from the rows of ``csv_path``. Returns both paths."""
    rows = results.read_rows(csv_path)
    summary_path = csv_path.with_name(csv_path.stem + "-summary.csv")
    write_summary(summary_path, exp, rows, run_id, seed)
    loads = [x.load1 for x in rows if x.load1 is not None]
    steals = [x.steal for x in rows if x.steal is not None]
    md = report_md(exp, csv_path, run_id, command_line(), how, machine_start or hoststat.machine(), loads, steals,
                   text, png, summary_path)
    return summary_path, md
