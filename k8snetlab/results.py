"""The tidy CSV every experiment writes, and the tables made from it.

One measurement per row. Columns (the README lists them too):

``run_id``, ``timestamp``, ``experiment``, ``topology``, ``mode`` (CNI type), ``datapath``
(kernel / ebpf / reference), ``scenario`` (node-to-node, pod-same-node, pod-cross-node,
lifecycle), ``src``, ``dst``, ``round`` (1..N; 0 for one-off rows), ``metric``
(``rtt_p50``...), ``value``, ``unit`` (``ms``, ``Gbit/s``, ``count``...), ``mtu``, ``kernel``.

Summaries take the median over rounds: robust to one disturbed round on a shared machine.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import secrets
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import K8sNetLabError

log = logging.getLogger(__name__)

COLUMNS = ["run_id", "timestamp", "experiment", "topology", "mode", "datapath", "scenario", "src", "dst",
           "round", "metric", "value", "unit", "mtu", "kernel"]


@dataclass
class Row:
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


class CsvWriter:
    """Appends rows to a new CSV file (header first), flushing each so a crash loses none."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "w", newline="")
        self._w = csv.writer(self._f)
        self._w.writerow(COLUMNS)

    def write(self, row: Row) -> None:
        d = dataclasses.asdict(row)
        self._w.writerow(["" if d[c] is None else d[c] for c in COLUMNS])
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "CsvWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_rows(path: str | os.PathLike) -> list[Row]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise K8sNetLabError(f"{path}: not a k8snetlab results CSV (missing columns: {', '.join(missing)})")
            rows = []
            for i, r in enumerate(reader, start=2):
                try:
                    rows.append(Row(**{**{c: r[c] for c in COLUMNS}, "round": int(r["round"]),
                                       "value": float(r["value"]), "mtu": int(r["mtu"]) if r["mtu"] else None}))
                except (ValueError, TypeError) as e:
                    raise K8sNetLabError(f"{path}: line {i}: {e}") from None
            return rows
    except OSError as e:
        raise K8sNetLabError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise K8sNetLabError(f"{path}: not a text CSV file") from None


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


def _medians(rows: list[Row], key) -> dict[tuple, float]:
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r.value)
    return {k: median(v) for k, v in groups.items()}


def ratio_table(rows: list[Row], numerator_mode: str, denominator_mode: str,
                skip_scenarios: tuple[str, ...] = ("lifecycle",)) -> list[dict[str, Any]]:
    """Per (scenario, metric, unit): the median of each mode and numerator/denominator."""
    meds = _medians([r for r in rows if r.scenario not in skip_scenarios],
                    lambda r: (r.scenario, r.metric, r.unit, r.mode))
    keys = sorted({k[:3] for k in meds}, key=lambda k: ([*dict.fromkeys(r.scenario for r in rows)].index(k[0]), k[1]))
    out = []
    for sc, metric, unit in keys:
        num, den = meds.get((sc, metric, unit, numerator_mode)), meds.get((sc, metric, unit, denominator_mode))
        ratio = num / den if num is not None and den not in (None, 0) else None
        out.append({"scenario": sc, "metric": metric, "unit": unit, "numerator": num, "denominator": den,
                    "ratio": ratio})
    return out


def compare(a_rows: list[Row], b_rows: list[Row]) -> list[dict[str, Any]]:
    """Join two runs on (mode, datapath, scenario, metric, unit); medians and ratio b/a."""
    key = lambda r: (r.mode, r.datapath, r.scenario, r.metric, r.unit)
    a, b = _medians(a_rows, key), _medians(b_rows, key)
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        out.append(dict(zip(("mode", "datapath", "scenario", "metric", "unit"), k), a=va, b=vb,
                        ratio=vb / va if va not in (None, 0) and vb is not None else None))
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.3g}"
    return str(v)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def kernel_release() -> str:
    return os.uname().release


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def plot(rows: list[Row], path_png: str | os.PathLike, metrics: tuple[str, ...] = ("rtt_p50", "tcp_throughput")) -> Path | None:
    """Bar charts of the medians per scenario and mode; None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    data = [r for r in rows if r.metric in metrics and r.scenario != "lifecycle"]
    if not data:
        return None
    modes = list(dict.fromkeys(r.mode for r in data))
    scenarios = list(dict.fromkeys(r.scenario for r in data))
    meds = _medians(data, lambda r: (r.metric, r.scenario, r.mode))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4))
    for ax, metric in zip(axes if len(metrics) > 1 else [axes], metrics):
        width = 0.8 / len(modes)
        for i, m in enumerate(modes):
            ys = [meds.get((metric, sc, m), 0) for sc in scenarios]
            ax.bar([x + i * width for x in range(len(scenarios))], ys, width, label=m)
        unit = next((r.unit for r in data if r.metric == metric), "")
        ax.set_title(f"{metric} (median over rounds)")
        ax.set_ylabel(unit)
        ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(scenarios))], scenarios)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path_png, dpi=100)
    plt.close(fig)
    return Path(path_png)
