"""The tidy CSV every experiment writes, and the tables and plots made from it.

One measurement per row (:class:`Row`; README "CSV columns"), so a file from any experiment can
be filtered, joined and plotted with any tool without knowing which experiment made it.
Summaries take the median over rounds: one round disturbed by another process on a shared
machine moves a median little and a mean a lot.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import secrets
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import K8sNetLabError, SpecError

log = logging.getLogger(__name__)

COLUMNS = ["run_id", "timestamp", "experiment", "topology", "mode", "datapath", "scenario",
           "src", "dst", "round", "metric", "value", "unit", "mtu", "kernel", "load1", "steal",
           "pin"]
# columns added later: a file without them is still read (the cells are empty)
OPTIONAL_COLUMNS = ("load1", "steal", "pin")
TEXT_COLUMNS = ("pin",)

# What the metrics mean, and their units (``METRIC_UNITS``; a row naming one of these with another unit is
# refused when written): ``rtt_min``, ``rtt_mean``, ``rtt_p50``, ``rtt_p90``, ``rtt_p99``,
# ``rtt_max`` in ``ms``; ``rtt_loss`` as a ``fraction`` (0..1); ``tcp_throughput`` in
# ``Gbit/s`` (receiver side); ``tcp_retransmits`` as a ``count``; ``cluster_up`` and
# ``cluster_down`` in ``s``; ``runtime_peak_rss`` in ``MB``; ``wire_ip_bytes``,
# ``inner_ip_bytes`` and ``encap_overhead`` (outer minus inner length of a captured packet:
# 0 plain, 20 IPIP, 50 VXLAN) in ``bytes``. BGP: ``bgp_sessions`` (established, per node),
# ``bgp_sessions_total`` and ``bgp_sessions_expected`` (the formula) as a ``count``;
# ``bgp_converge`` (speaker start until every node has every pod route in its FIB),
# ``bgp_withdraw``, ``bgp_restore``, ``underlay_up``, ``agents_up`` in ``s``; ``speaker_rss``,
# ``speaker_pss`` and ``speaker_mem`` (the daemon's own count) in ``MB``.
# kube-proxy modes: ``conn_rate`` (sequential connections per second) in ``conn/s``;
# ``connect_p50``/``connect_p90`` (TCP connect time of fresh connections) and
# ``first_packet_added`` (connect_p50 minus that of a node with one Service) in ``us``, with
# ``first_packet_added_ci_low``/``_ci_high`` (its bootstrap 95 % interval) in ``us``;
# ``program_time`` (one sync on an empty node), ``resync_time`` (the same again) and
# ``change_time`` (a sync after one Service lost its endpoint) in ``s``; ``check_time`` (the
# proxier's check that the node's rules are as it left them, one sample per row) in ``us``;
# ``repair_time`` (the sync after the tables were flushed by hand) in ``s``.
# Equal-cost paths: ``ecmp_next_hops`` and ``ecmp_paths_used`` (next hops carrying at least 10%
# of the connection attempts) as a ``count``, ``ecmp_max_share`` as a ``fraction``.
#
# Golden signals of a TCP measurement (the framework, :mod:`k8snetlab.framework`):
# ``cpu_per_gbit`` (CPU-seconds the whole machine spent per gigabit moved, idle baseline
# subtracted) in ``s/Gbit``, with ``cpu_baseline`` (the machine's busy CPUs in a quiet second
# just before, in ``cores``: near the CPU count, the machine was saturated by others and
# cpu_per_gbit means little) and ``proc_cpu_per_gbit`` (user + system time of the two iperf3
# processes per gigabit, from iperf3's own report: robust to other load, softirq work not in it); ``rx_pps`` (packets per second the receiver took in) in
# ``packets/s``; ``if_drops`` (interface drops at both ends) as a ``count``; ``softirq_share``
# (softirq time over all busy CPU time) as a ``fraction``; on shaped links ``qdisc_drops`` as a
# ``count`` and ``qdisc_backlog`` (the largest backlog seen) in ``bytes``.
METRIC_UNITS: dict[str, str] = {
    "rtt_min": "ms", "rtt_mean": "ms", "rtt_p50": "ms", "rtt_p90": "ms", "rtt_p99": "ms",
    "rtt_max": "ms", "rtt_loss": "fraction",
    "tcp_throughput": "Gbit/s", "tcp_retransmits": "count",
    "cluster_up": "s", "cluster_down": "s", "runtime_peak_rss": "MB",
    # a captured packet: the IPv4 length on the wire, the pod's own packet inside, the difference
    "wire_ip_bytes": "bytes", "inner_ip_bytes": "bytes", "encap_overhead": "bytes",
    # BGP control plane (experiments/bgp_mesh_vs_rr.py): sessions, convergence, speaker memory
    "underlay_up": "s", "agents_up": "s",
    "bgp_sessions": "count", "bgp_sessions_total": "count", "bgp_sessions_expected": "count",
    "bgp_converge": "s", "bgp_withdraw": "s", "bgp_restore": "s",
    "speaker_rss": "MB", "speaker_pss": "MB", "speaker_mem": "MB",
    # kube-proxy modes (experiments/kube_proxy_modes.py): fresh connections, rule programming
    "conn_rate": "conn/s", "connect_p50": "us", "connect_p90": "us", "first_packet_added": "us",
    "first_packet_added_ci_low": "us", "first_packet_added_ci_high": "us",
    "program_time": "s", "resync_time": "s", "change_time": "s", "services": "count",
    "check_time": "us", "repair_time": "s",
    # equal-cost paths (experiments/cni_modes.py on a fabric): next hops of the source node's
    # router, how many carried at least 10% of the connection attempts, the largest share
    "ecmp_next_hops": "count", "ecmp_paths_used": "count", "ecmp_max_share": "fraction",
    # golden signals of a TCP measurement: saturation, traffic, errors
    "cpu_per_gbit": "s/Gbit", "proc_cpu_per_gbit": "s/Gbit", "cpu_baseline": "cores", "rx_pps": "packets/s", "if_drops": "count", "softirq_share": "fraction",
    "qdisc_drops": "count", "qdisc_backlog": "bytes",
    # kernel drops (skb:kfree_skb) in the measured namespaces: real reasons, and NOT_SPECIFIED
    "kernel_drops": "count", "kernel_drops_noise": "count",
}

PLOT_METRICS = ("rtt_p50", "tcp_throughput")


class ResultsFileError(SpecError):
    """A file given as results CSV is not one (missing, not text, wrong columns, bad cell).

    Bad input like a bad cluster file, hence a SpecError: the CLI exits 2 with one line.
    """


@dataclass
class Row:
    """One measurement; the fields are the CSV columns:

    - ``run_id``      one experiment run: UTC time plus a short random suffix (``new_run_id()``)
    - ``timestamp``   when the row was measured, ISO 8601 (``utc_timestamp()`` gives UTC)
    - ``experiment``  the experiment's name (``hostgw_vs_ipip``)
    - ``topology``    the cluster file's name
    - ``mode``        the CNI type measured (``host-gw``, ``ipip``, ...); ``all`` for whole-run rows
    - ``datapath``    how the mode was realised (``kernel``, ``ebpf``, ``reference``); may be empty
    - ``scenario``    what path the traffic took (``node-to-node``, ``pod-same-node``,
      ``pod-cross-node``), or ``lifecycle`` for set-up and tear-down timings
    - ``src``, ``dst`` the endpoints (pod or node names); empty for lifecycle rows
    - ``round``       1..N repetition of the measurement; 0 for one-off rows
    - ``metric``      what was measured, e.g. ``rtt_p50``
    - ``value``       the number (a float)
    - ``unit``        the unit of ``value``, always written out, e.g. ``ms``
    - ``mtu``         MTU of the path's interfaces in bytes; empty when not applicable
    - ``kernel``      ``uname -r`` of the machine (``kernel_release()``)
    - ``load1``       the machine's 1-minute load average when the measurement started (empty for
      one-off rows); files written before this column existed are read without it
    - ``steal``       the share of CPU time the hypervisor stole during the measurement (0..1)
    - ``pin``         where iperf3 ran (``--pin``): ``same:0`` (client and server on CPU 0),
      ``split:0/1`` (client on 0, server on 1) or ``none``; empty for rows without a TCP test
    """

    run_id: str
    timestamp: str
    experiment: str
    topology: str
    mode: str
    datapath: str
    scenario: str
    src: str
    dst: str
    round: int
    metric: str
    value: float
    unit: str
    mtu: int | None
    kernel: str
    load1: float | None = None
    steal: float | None = None
    pin: str | None = None

    def __post_init__(self) -> None:
        self.round = int(self.round)
        self.value = float(self.value)
        self.mtu = None if self.mtu is None else int(self.mtu)
        self.load1 = None if self.load1 in (None, "") else float(self.load1)
        self.steal = None if self.steal in (None, "") else float(self.steal)
        self.pin = None if self.pin in (None, "") else str(self.pin)

    def cells(self) -> list[str]:
        """The row as CSV cells; repr() keeps every digit of the float."""
        out = []
        for name in COLUMNS:
            v = getattr(self, name)
            out.append("" if v is None else repr(v) if isinstance(v, float) else str(v))
        return out


def utc_timestamp() -> str:
    """Now, as ISO 8601 UTC to the second (``2026-11-21T22:05:29Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def kernel_release() -> str:
    return os.uname().release


def new_run_id() -> str:
    """``20261121T220529Z-3fa9c1``: sortable by time, unique across runs started together."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


# ---------------------------------------------------------------- writing and reading

class CsvWriter:
    """Writes a new results CSV: the header at once, then each row, flushed, so a run that
    crashes half-way keeps every row it measured. An existing file is replaced."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w", newline="", encoding="utf-8")
        self._w = csv.writer(self._f)
        self._w.writerow(COLUMNS)
        self._f.flush()

    def write(self, row: Row) -> None:
        if not isinstance(row, Row):
            raise TypeError(f"CsvWriter.write takes a Row, not {type(row).__name__}")
        unit = METRIC_UNITS.get(row.metric)
        if unit is not None and row.unit != unit:
            raise K8sNetLabError(f"metric {row.metric} is measured in {unit!r}, "
                                 f"not {row.unit!r} (see results.METRIC_UNITS)")
        self._w.writerow(row.cells())
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "CsvWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_rows(path: str | os.PathLike) -> list[Row]:
    """All rows of a results CSV. Anything else raises ResultsFileError (a K8sNetLabError)
    with one line naming the file (and the line, or the missing columns)."""
    what = "not a k8snetlab results CSV"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ResultsFileError(f"{path}: empty file, {what} "
                                     f"(expected the header {','.join(COLUMNS)})")
            missing = [c for c in COLUMNS if c not in header and c not in OPTIONAL_COLUMNS]
            if missing:
                raise ResultsFileError(f"{path}: {what}: missing columns {', '.join(missing)}")
            index = {c: header.index(c) for c in COLUMNS if c in header}
            rows = []
            for cells in reader:
                if not cells:
                    continue
                rows.append(_row_from(cells, index, len(header), f"{path}:{reader.line_num}"))
            return rows
    except FileNotFoundError:
        raise ResultsFileError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ResultsFileError(f"{path}: {what} (not UTF-8 text)") from None
    except csv.Error as e:
        raise ResultsFileError(f"{path}: {what} ({e})") from None
    except OSError as e:
        raise ResultsFileError(f"{path}: cannot read: {e.strerror or e}") from None


def _row_from(cells: list[str], index: dict[str, int], width: int, where: str) -> Row:
    if len(cells) != width:
        raise ResultsFileError(f"{where}: expected {width} fields, found {len(cells)}")
    d: dict[str, Any] = {c: cells[i] for c, i in index.items()}
    for name, conv in (("round", int), ("value", float)):
        try:
            d[name] = conv(d[name])
        except ValueError:
            raise ResultsFileError(f"{where}: column {name!r} is not a number: "
                                   f"{d[name]!r}") from None
    try:
        d["mtu"] = int(d["mtu"]) if d["mtu"] != "" else None
    except ValueError:
        raise ResultsFileError(f"{where}: column 'mtu' is not an integer: {d['mtu']!r}") from None
    for name in OPTIONAL_COLUMNS:
        if name in TEXT_COLUMNS:
            d[name] = d.get(name) or None
            continue
        try:
            d[name] = float(d[name]) if d.get(name, "") != "" else None
        except ValueError:
            raise ResultsFileError(f"{where}: column {name!r} is not a number: {d[name]!r}") from None
    return Row(**d)


# ---------------------------------------------------------------- tables

def median(values: Iterable[float]) -> float:
    """The median; NaN if any value is NaN (unknown stays unknown). Raises on no values."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("median of no values")
    if any(math.isnan(v) for v in vals):
        return math.nan
    return statistics.median(vals)


def _group(rows: Iterable[Row], key: Callable[[Row], tuple]) -> dict[tuple, list[float]]:
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r.value)
    return groups


def _attrs(names: Sequence[str]) -> Callable[[Row], tuple]:
    bad = [n for n in names if n not in COLUMNS]
    if bad:
        raise ValueError(f"unknown column(s) {', '.join(bad)}; columns are {', '.join(COLUMNS)}")
    return lambda r: tuple(getattr(r, n) for n in names)


def summarize(rows: Iterable[Row], by: Sequence[str] = ("scenario", "metric", "unit"),
              modes: Sequence[str] | None = None,
              skip_scenarios: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One dict per group of ``by``: the group's columns, then per mode the median over
    rounds (None where the mode has no rows). ``modes`` fixes the order (default: as they
    first appear). Rows of one mode with several datapaths are pooled unless ``datapath``
    is in ``by``."""
    rows = [r for r in rows if r.scenario not in skip_scenarios]
    if modes is None:
        modes = list(dict.fromkeys(r.mode for r in rows))
    key = _attrs(by)
    groups = _group((r for r in rows if r.mode in modes), lambda r: (key(r), r.mode))
    out = []
    for k in dict.fromkeys(g for g, _ in groups):
        entry: dict[str, Any] = dict(zip(by, k))
        for m in modes:
            vals = groups.get((k, m))
            entry[m] = median(vals) if vals else None
        out.append(entry)
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def ratio_table(rows: Iterable[Row], numerator_mode: str, denominator_mode: str,
                by: Sequence[str] = ("scenario", "metric", "unit"),
                skip_scenarios: Sequence[str] = ("lifecycle",)) -> list[dict[str, Any]]:
    """Per (scenario, metric, unit): the median of each mode and numerator / denominator.

    Each dict holds the ``by`` columns and ``numerator``, ``denominator``, ``ratio``; a
    side without rows is None and so is the ratio (also when the denominator is 0).
    """
    out = []
    for s in summarize(rows, by, [numerator_mode, denominator_mode], skip_scenarios):
        num, den = s[numerator_mode], s[denominator_mode]
        out.append({**{k: s[k] for k in by}, "numerator": num, "denominator": den,
                    "ratio": _ratio(num, den)})
    return out


COMPARE_KEY = ("mode", "datapath", "scenario", "metric", "unit")


def compare(a_rows: Iterable[Row], b_rows: Iterable[Row]) -> list[dict[str, Any]]:
    """Join two files on (mode, datapath, scenario, metric, unit).

    Each dict: the key columns, ``a`` and ``b`` (median over the rows of that file),
    ``n_a`` and ``n_b`` (how many rows), ``ratio`` = b / a. A key present in only one file
    is listed with the other side None (n 0) and no ratio. Order: as in A, then B's extras.
    """
    key = _attrs(COMPARE_KEY)
    a, b = _group(a_rows, key), _group(b_rows, key)
    out = []
    for k in dict.fromkeys([*a, *b]):
        va = median(a[k]) if k in a else None
        vb = median(b[k]) if k in b else None
        out.append({**dict(zip(COMPARE_KEY, k)), "a": va, "b": vb,
                    "n_a": len(a.get(k, ())), "n_b": len(b.get(k, ())), "ratio": _ratio(vb, va)})
    return out


def _is_ratio(header: str) -> bool:
    return "ratio" in header.lower() or "/" in header


def format_number(v: Any, ratio: bool = False) -> str:
    """None -> '-', ints as they are, floats to 4 significant digits (3 for ratios),
    never in exponent notation for values of 1000 and more."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.{3 if ratio else 4}g}"


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table: a header, a rule, one line per row; numbers right-aligned.
    Columns whose header says ``ratio`` or holds a ``/`` (``B/A``) get 3 significant digits."""
    ratio_cols = [_is_ratio(h) for h in headers]
    numeric = [True] * len(headers)
    body = []
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f"row has {len(r)} cells for {len(headers)} headers: {r!r}")
        body.append([format_number(c, ratio_cols[i]) for i, c in enumerate(r)])
        for i, c in enumerate(r):
            if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float))):
                numeric[i] = False
    widths = [max([len(h)] + [len(line[i]) for line in body]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(list(headers)), "  ".join("-" * w for w in widths),
                      *(line(b) for b in body)])


# ---------------------------------------------------------------- plot

def plot(rows: Iterable[Row], path_png: str | os.PathLike,
         metrics: Sequence[str] = PLOT_METRICS, modes: Sequence[str] | None = None,
         skip_scenarios: Sequence[str] = ("lifecycle",), title: str | None = None) -> Path | None:
    """Bar charts, one panel per metric: per scenario (groups on the x axis) and mode (one
    bar each) the mean over rounds, an error bar for its 95 % confidence interval (Student's
    t) and one dot per round. A bar is drawn only where there are rows.

    Returns the PNG's path; None (and a log line) when matplotlib is not installed or no
    row has one of ``metrics``.
    """
    from . import stats
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("no plot: matplotlib is not installed (pip install matplotlib)")
        return None
    data = [r for r in rows if r.metric in metrics and r.scenario not in skip_scenarios]
    if not data:
        log.warning("no plot: no rows with metric %s", " or ".join(metrics))
        return None
    if modes is None:
        modes = list(dict.fromkeys(r.mode for r in data))
    panels = [m for m in metrics if any(r.metric == m for r in data)]
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    FigureCanvasAgg(fig)          # the Agg (file-only) backend, without pyplot's global state
    for n, metric in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), n)
        these = [r for r in data if r.metric == metric]
        scenarios = list(dict.fromkeys(r.scenario for r in these))
        groups = _group(these, lambda r: (r.scenario, r.mode))
        width = 0.8 / max(1, len(modes))
        for i, mode in enumerate(modes):
            xs, ys, lo, hi = [], [], [], []
            for x, sc in enumerate(scenarios):
                vals = groups.get((sc, mode))
                if not vals or any(math.isnan(v) for v in vals):
                    continue
                s = stats.describe(vals)
                xc = x + (i - (len(modes) - 1) / 2) * width
                xs.append(xc)
                ys.append(s.mean)
                lo.append(s.mean - s.ci_low)
                hi.append(s.ci_high - s.mean)
                ax.scatter([xc + (k - (len(vals) - 1) / 2) * width / max(4, 2 * len(vals)) for k in range(len(vals))],
                           vals, s=9, color="black", zorder=3)
            if xs:
                bars = ax.bar(xs, ys, width, label=mode, color=f"C{i % 10}",   # one colour per mode in every panel
                              yerr=[lo, hi], capsize=3, ecolor="dimgray")
                ax.bar_label(bars, labels=[format_number(y) for y in ys], fontsize=7, label_type="center")
        units = sorted({r.unit for r in these})
        ax.set_title(f"{metric}: mean, 95 % CI, rounds", fontsize=9)
        ax.set_ylabel(" / ".join(units))
        ax.set_xticks(range(len(scenarios)))
        ax.set_xticklabels(scenarios, fontsize=8)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    log.info("plot written to %s", out)
    return out


__all__ = ["COLUMNS", "METRIC_UNITS", "ResultsFileError", "Row", "CsvWriter", "read_rows",
           "median", "summarize", "ratio_table", "compare", "format_number", "format_table",
           "kernel_release", "new_run_id", "utc_timestamp", "plot"]
