"""``k8snetlab compare A.csv B.csv``: did B get faster or slower than A, beyond the noise?

Two runs of one experiment are joined on (mode, datapath, scenario, metric, unit). Per key
the ratio of means B/A comes with a 95 % bootstrap interval (each run's rounds resampled on
their own: the runs are independent). The verdict follows the interval and the metric's
direction: for throughput an interval entirely above 1 is ``faster``; for a latency, a time
or CPU per gigabit it is ``slower``; an interval containing 1 is ``no significant change``.
Metrics with no better direction (counts) say ``higher`` or ``lower``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from . import results, stats

HIGHER_IS_FASTER = {"tcp_throughput", "conn_rate", "rx_pps"}
LOWER_IS_FASTER_PREFIX = ("rtt_", "connect_")
LOWER_IS_FASTER = {"first_packet_added", "program_time", "resync_time", "change_time", "cluster_up",
                   "cluster_down", "bgp_converge", "bgp_withdraw", "bgp_restore", "underlay_up", "agents_up",
                   "cpu_per_gbit"}
NO_CHANGE = "no significant change"
KEY = ("mode", "datapath", "scenario", "metric", "unit")


@dataclass
class Entry:
    key: tuple[str, ...]
    a: list[float]
    b: list[float]
    ratio: stats.Ratio | None
    verdict: str


def direction(metric: str) -> int:
    """+1: higher is faster; -1: lower is faster; 0: neither."""
    if metric in HIGHER_IS_FASTER:
        return 1
    if metric in LOWER_IS_FASTER or metric.startswith(LOWER_IS_FASTER_PREFIX) and metric != "rtt_loss":
        return -1
    return 0


def _verdict(metric: str, above: bool, below: bool) -> str:
    if not above and not below:
        return NO_CHANGE
    d = direction(metric)
    if d == 0:
        return "higher" if above else "lower"
    return "faster" if (above and d > 0) or (below and d < 0) else "slower"


def placement_note(a_rows: Iterable[results.Row], b_rows: Iterable[results.Row]) -> str | None:
    """A line when the two runs placed iperf3 differently (``pin`` column): on few CPUs the
    placement alone moves throughput, so such a comparison mixes two changes."""
    pa = sorted({r.pin or "none" for r in a_rows if r.metric == "tcp_throughput"})
    pb = sorted({r.pin or "none" for r in b_rows if r.metric == "tcp_throughput"})
    if pa and pb and pa != pb:
        return (f"note: iperf3 ran with --pin {', '.join(pa)} in A and {', '.join(pb)} in B: the CPU placement "
                "alone changes throughput on few CPUs")
    return None


def compare(a_rows: Iterable[results.Row], b_rows: Iterable[results.Row], seed: int = 1,
            a_name: str = "A", b_name: str = "B") -> list[Entry]:
    """One entry per key present in either run (order: A's, then B's extras). Raises
    ResultsFileError when a file has no rows or the files come from different experiments."""
    a_rows, b_rows = list(a_rows), list(b_rows)
    for rows, name in ((a_rows, a_name), (b_rows, b_name)):
        if not rows:
            raise results.ResultsFileError(f"{name}: no measurements (only a header): nothing to compare")
    ea, eb = sorted({r.experiment for r in a_rows}), sorted({r.experiment for r in b_rows})
    if ea != eb:
        raise results.ResultsFileError(f"{a_name} is from {', '.join(ea)} and {b_name} from {', '.join(eb)}: "
                                       "compare two runs of the same experiment")
    ga: dict[tuple, list[float]] = {}
    gb: dict[tuple, list[float]] = {}
    for rows, g in ((a_rows, ga), (b_rows, gb)):
        for r in rows:
            g.setdefault(tuple(getattr(r, k) for k in KEY), []).append(r.value)
    out = []
    for key in dict.fromkeys([*ga, *gb]):
        a, b = ga.get(key, []), gb.get(key, [])
        metric = key[3]
        bad = any(math.isnan(v) or math.isinf(v) for v in a + b)
        if not a or not b or bad:
            out.append(Entry(key, a, b, None, f"only in {a_name if a else b_name}" if not (a and b) else "n/a"))
            continue
        ma, mb = math.fsum(a) / len(a), math.fsum(b) / len(b)
        if ma == 0:
            verdict = NO_CHANGE if mb == 0 or min(b) <= max(a) else _verdict(metric, mb > 0, mb < 0)
            out.append(Entry(key, a, b, None, verdict))
            continue
        rt = stats.unpaired_ratio(b, a, seed=seed)
        if min(len(a), len(b)) < 2 and a != b:
            out.append(Entry(key, a, b, rt, "one value: no interval"))
            continue
        out.append(Entry(key, a, b, rt, _verdict(metric, rt.ci_low > 1, rt.ci_high < 1)))
    return out


def table(entries: list[Entry]) -> tuple[list[str], list[list]]:
    headers = ["mode", "datapath", "scenario", "metric", "unit", "n A", "A mean", "n B", "B mean",
               "B/A [95 % CI]", "verdict"]
    body = []
    for e in entries:
        mean = lambda xs: math.fsum(xs) / len(xs) if xs else None
        shown = "-" if e.ratio is None else stats.fmt_ratio(e.ratio) if e.ratio.n > 1 or len(e.a) + len(e.b) > 2 \
            else f"{e.ratio.value:.3g}"
        body.append([*e.key, len(e.a), mean(e.a), len(e.b), mean(e.b), shown, e.verdict])
    return headers, body
