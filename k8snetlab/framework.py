"""One experiment framework: an experiment says *what* to compare, this module runs it.

An experiment (a subclass of :class:`Experiment`) declares its variants (one cluster each: a
CNI mode with options), the scenarios measured in each (pairs of endpoints), what one
measurement yields (by default RTT percentiles from ping and TCP throughput from iperf3 with
its golden signals), the comparisons it reports (ratios of two variants, paired by round)
and its targets. The framework then:

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

from __future__ import annotations

import argparse
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
from typing import Any, Callable, Iterable, Sequence

from . import experiment, hoststat, measure, results, stats
from .errors import SpecError

log = logging.getLogger(__name__)

DEFAULT_MAX_REPEAT = 12
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
    src: experiment.Endpoint
    dst: experiment.Endpoint
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
    tools: Sequence[str] = ("ping", "iperf3")

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
            out.append((v, base.with_cni(v.cni, **({v.cni: section} if section else {}))))
        return out

    def setup(self, run: "Run", variant: Variant, cluster: Any) -> None:
        """After a cluster is up (add probe pods, ...)."""

    def scenarios(self, run: "Run", variant: Variant, cluster: Any) -> list[Path2]:
        pod_mtu = getattr(cluster.mode, "mtu", None)
        out = []
        for sc in experiment.standard_scenarios(cluster):
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
    p = experiment.parser(exp.description or exp.name, default_repeat=exp.default_repeat)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 run (default %(default)s)")
    p.add_argument("--omit", type=float, default=1.0,
                   help="seconds of TCP ramp-up iperf3 leaves out (-O; default %(default)s)")
    p.add_argument("--pings", type=int, default=200, help="ping samples per measurement (default %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the shuffled order and the bootstrap (default: a new one, printed)")
    p.add_argument("--ci", type=float, default=exp.default_ci, metavar="PCT",
                   help="add rounds until every headline ratio's 95%% interval is within PCT %% "
                        "(default %(default)s)")
    p.add_argument("--max-repeat", type=int, default=DEFAULT_MAX_REPEAT,
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
        self.out_dir, self.run_id, self.csv_path = experiment.output(args, exp.name)
        self.kernel = results.kernel_release()
        self.meta: dict[str, tuple[str, str]] = {}       # label -> (topology, datapath)
        self.writer: results.CsvWriter | None = None
        self.freezer: hoststat.Freezer | None = None
        self.baseline_rate = 0.0
        self.last_steal: float | None = None              # steal share during the last TCP test
        self.notes: list[str] = []
        self.loads: list[float] = []
        self.steals: list[float] = []
        self.shaped: list[tuple[str, str]] = []           # (netns path, device) of shaped links
        self.command = " ".join(shlex.quote(a) for a in [sys.executable if sys.argv[0].endswith(".py") else "",
                                                         *sys.argv] if a)
        self.machine_start = hoststat.machine()

    # -- rows
    def row(self, label: str, path: Path2 | None, rnd: int, metric: str, value: float, unit: str,
            load1: float | None = None, steal: float | None = None) -> None:
        assert self.writer is not None
        topology, datapath = self.meta.get(label, (self.base.name, ""))
        self.writer.write(results.Row(
            run_id=self.run_id, timestamp=results.utc_timestamp(), experiment=self.exp.name,
            topology=topology, mode=label, datapath=datapath,
            scenario=path.name if path else "lifecycle", src=path.src.name if path else "",
            dst=path.dst.name if path else "", round=rnd, metric=metric, value=value, unit=unit,
            mtu=path.mtu if path else None, kernel=self.kernel, load1=load1, steal=steal))

    # -- the default measurement: ping, then iperf3 with its golden signals
    def ping_and_tcp(self, path: Path2, duration_s: float) -> list[tuple[str, float, str]]:
        out: list[tuple[str, float, str]] = []
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
        before_src, before_dst = hoststat.ns_counters(path.src.netns), hoststat.ns_counters(path.dst.netns)
        qdisc_before = self.qdisc_stats()
        cpu0 = hoststat.cpu_times()
        tcp = measure.iperf3(path.src.netns, path.dst.netns, path.dst.ip, duration_s=duration_s,
                             omit_s=self.args.omit, connect_ip=path.connect_ip, bitrate=self.args.rate)
        cpu = hoststat.delta(cpu0, hoststat.cpu_times())
        after_src, after_dst = hoststat.ns_counters(path.src.netns), hoststat.ns_counters(path.dst.netns)
        rx_bytes = hoststat.sum_delta(before_dst, after_dst, "rx_bytes")
        rx_packets = hoststat.sum_delta(before_dst, after_dst, "rx_packets")
        drops = sum(hoststat.sum_delta(a, b, f) for a, b in ((before_src, after_src), (before_dst, after_dst))
                    for f in ("rx_drop", "tx_drop"))
        out = [("tcp_throughput", tcp.gbit_s, "Gbit/s"), ("tcp_retransmits", tcp.retransmits, "count"),
               ("rx_pps", rx_packets / cpu.wall_s if cpu.wall_s > 0 else 0.0, "packets/s"),
               ("if_drops", drops, "count"),
               ("softirq_share", cpu.softirq_s / cpu.busy_s if cpu.busy_s > 0 else 0.0, "fraction")]
        per = hoststat.cpu_per_gbit(cpu, self.baseline_rate, rx_bytes * 8 / 1e9)
        if per is not None:
            out.append(("cpu_per_gbit", per, "s/Gbit"))
        if self.shaped:
            after = self.qdisc_stats()
            out.append(("qdisc_drops", sum(after[k][0] - qdisc_before.get(k, (0, 0))[0] for k in after), "count"))
            out.append(("qdisc_backlog", max((v[1] for v in after.values()), default=0), "bytes"))
        self.last_steal = cpu.steal_fraction
        return out

    def qdisc_stats(self) -> dict[tuple[str, str], tuple[int, int]]:
        from . import shaping
        return {(ns, dev): shaping.qdisc_counters(ns, dev) for ns, dev in self.shaped}

    def measure_baseline(self) -> None:
        """The machine's busy rate in a quiet second (every cluster paused): the CPU the
        rest of the machine spends, subtracted from each measurement's CPU time."""
        assert self.freezer is not None
        with self.freezer.only(None):
            a = hoststat.cpu_times()
            time.sleep(1.0)
            d = hoststat.delta(a, hoststat.cpu_times())
        self.baseline_rate = d.busy_rate


# ---------------------------------------------------------------- the run itself

def run(exp: Experiment, args: argparse.Namespace) -> int:
    from . import proc
    from .cluster import Cluster
    check_args(exp, args)
    base = experiment.load_topology(args)
    if args.link_rate:
        from .shaping import with_link_rate
        base = with_link_rate(base, args.link_rate)
    plan_specs = exp.specs(args, base)
    proc.require_root(exp.name)
    proc.require(*exp.tools)
    r = Run(exp, args, base)
    print(f"{exp.name}: run {r.run_id}, seed {r.seed} (--seed {r.seed} repeats this order)", file=sys.stderr)

    with contextlib.ExitStack() as stack, results.CsvWriter(r.csv_path) as writer:
        r.writer = writer
        clusters: dict[str, Any] = {}
        variants: dict[str, Variant] = {}
        for v, s in plan_specs:
            t0 = time.monotonic()
            c = Cluster(s)
            stack.callback(c.stop)
            c.start()
            clusters[v.label], variants[v.label] = c, v
            r.meta[v.label] = (c.spec.name, c.mode.datapath)
            exp.setup(r, v, c)
            print(f"{v.label}: cluster up in {time.monotonic() - t0:.2f} s (datapath {c.mode.datapath}, "
                  f"pod MTU {getattr(c.mode, 'mtu', '-')})", file=sys.stderr)
            r.row(v.label, None, 0, "cluster_up", c.timings["start_s"], "s")
        if args.link_rate:
            from .shaping import shaped_devices
            r.shaped = [d for c in clusters.values() for d in shaped_devices(c)]
        r.freezer = hoststat.Freezer({k: hoststat.host_namespaces(c) for k, c in clusters.items()},
                                     enabled=not args.no_pause)
        stack.callback(r.freezer.resume)
        paths = {k: exp.scenarios(r, variants[k], c) for k, c in clusters.items()}
        exp.once(r, clusters)

        full = [(k, p) for k in clusters for p in paths[k]]
        needed = {(c.num, c.scenario) for c in exp.comparisons if c.headline} | \
                 {(c.den, c.den_scenario or c.scenario) for c in exp.comparisons if c.headline}
        lean = [(k, p) for k, p in full if (k, p.name) in needed] or full

        def one_round(rnd: int, items: list[tuple[str, Path2]], progress: experiment.Progress | None,
                      duration: float) -> None:
            order = list(items)
            r.rng.shuffle(order)
            r.measure_baseline()
            for k, p in order:
                if progress:
                    progress.step(f"round {rnd} {k} {p.name}")
                load1 = hoststat.loadavg()
                r.last_steal = None
                with r.freezer.only(k):
                    got = exp.measure(r, variants[k], clusters[k], p, duration, warmup=rnd == 0)
                if rnd == 0:
                    continue
                r.loads.append(load1)
                steal = r.last_steal
                if steal is not None:
                    r.steals.append(steal)
                for metric, value, unit in got:
                    r.row(k, p, rnd, metric, value, unit, load1=load1, steal=steal)

        if not args.quick:
            print("warm-up round (not recorded)", file=sys.stderr)
            one_round(0, full, None, 1.0)
        progress = experiment.Progress(args.repeat * len(full))
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
                one_round(rnd, lean, None, args.duration)
        r.freezer.resume()
        for k in reversed(list(clusters)):
            c = clusters.pop(k)
            c.stop()
            r.row(k, None, 0, "cluster_down", c.timings["stop_s"], "s")
        r.row("all", None, 0, "runtime_peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MB")

    rows = results.read_rows(r.csv_path)
    text = summary(exp, rows, r.seed, quick=args.quick, stop_reason=stop_reason,
                   link_rate=args.link_rate)
    extra = exp.extra_summary(r, rows)
    if extra:
        text += "\n" + "\n".join(extra)
    warn = hoststat.busy_warning(max(r.loads, default=0.0), max(r.steals, default=0.0))
    if warn:
        text += f"\n\nWARNING: {warn} (load average up to {max(r.loads):.2f}, steal up to " \
                f"{100 * max(r.steals, default=0):.0f} %; columns load1 and steal of the CSV)"
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


def _rows_so_far(r: Run) -> list[results.Row]:
    return results.read_rows(r.csv_path)


def main(exp: Experiment, argv: Sequence[str] | None = None) -> int:
    return experiment.main(lambda a: run(exp, a), parser(exp), argv)


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
    """Half-width in percent of each headline comparison's interval (inf with under 2 rounds)."""
    out = {}
    for c in exp.comparisons:
        if not c.headline:
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


def overhead_limits(exp: Experiment, rows: list[results.Row]) -> dict[str, float]:
    """mode -> the payload per 1500-byte packet over host-gw's (1.0 for plain routing)."""
    from .shaping import payload_per_packet
    out = {}
    for v in exp.variants:
        out[v.label] = payload_per_packet(v) / payload_per_packet(Variant("host-gw", "host-gw"))
    return out


def summary(exp: Experiment, rows: list[results.Row], seed: int, quick: bool = False,
            stop_reason: str | None = None, link_rate: str | None = None) -> str:
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
    limits = overhead_limits(exp, rows) if link_rate else {}
    comps = [c for c in exp.comparisons]
    if comps:
        lines.append("\nComparisons (TCP throughput unless named):")
        for c in comps:
            rt = comparison_ratio(rows, c, seed)
            shown = ("not measured" if rt is None else f"{stats.fmt_ratio(rt)} (n={rt.n})" if rt.n > 1
                     else f"{rt.value:.3g} (one round: no interval)")
            extra = ""
            if limits and c.metric == "tcp_throughput" and c.num in limits and c.den in limits \
                    and not c.den_scenario:
                lim = limits[c.num] / limits[c.den]
                extra = f"   header-overhead limit {lim:.3f}"
            elif c.limit is not None:
                extra = f"   limit {c.limit:.3f}"
            lines.append(f"  {'*' if c.headline else ' '} {c.label} ({c.scenario}"
                         f"{'' if c.metric == 'tcp_throughput' else ', ' + c.metric}): {shown}{extra}")
    if exp.targets:
        lines.append("\nTargets (met: the whole interval on the right side; MISSED: all of it on the wrong "
                     "side; inconclusive: it crosses the target):")
        lines += [target_line(rows, t, seed) for t in exp.targets]
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
    md = r.csv_path.with_suffix(".md")
    m = r.machine_start
    end_load = " ".join(open("/proc/loadavg").read().split()[:3])
    lines = [f"# {r.exp.name}, run {r.run_id}", "",
             r.exp.description, "",
             "## Command", "", "```", r.command, "```", "",
             f"Seed {r.seed}. Rounds interleaved, shuffled within each round; warm-up round discarded; "
             f"{'other clusters paused while one measures' if not r.args.no_pause else 'other clusters running'}.",
             "", "## Machine", "",
             "| | |", "|---|---|",
             f"| kernel | {m['kernel']} |", f"| CPUs | {m['cpus']} x {m['cpu model']} |",
             f"| load average at start | {m['load average']} |", f"| load average at end | {end_load} |",
             f"| load average during measurements | "
             f"{min(r.loads, default=0):.2f} .. {max(r.loads, default=0):.2f} |",
             f"| steal time during measurements | up to {100 * max(r.steals, default=0):.1f} % |", "",
             "## Summary", "", "```", text, "```", ""]
    if png:
        lines += ["## Plots", "", f"![{r.exp.name}]({png.name})", "",
                  "Bars: mean over rounds; error bars: 95 % confidence interval; dots: the rounds.", ""]
    lines += ["## Files", "", f"- raw rows: `{r.csv_path.name}`", f"- statistics: `{summary_path.name}`", ""]
    md.write_text("\n".join(lines))
    return md
