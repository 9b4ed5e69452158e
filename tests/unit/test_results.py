"""The results CSV: schema, round trip, tables, compare, plot (no root)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from k8snetlab import results
from k8snetlab.errors import K8sNetLabError
from k8snetlab.results import COLUMNS, CsvWriter, Row, read_rows

REPO = Path(__file__).resolve().parents[2]


def row(mode="host-gw", scenario="pod-cross-node", metric="rtt_p50", value=0.05, unit="ms",
        rnd=1, datapath="kernel", mtu=1500, **kw) -> Row:
    base = dict(run_id="20261121T220529Z-3fa9c1", timestamp="2026-11-21T22:05:29Z",
                experiment="hostgw_vs_ipip", topology="three_nodes", mode=mode, datapath=datapath,
                scenario=scenario, src="client-0", dst="server-1", round=rnd, metric=metric,
                value=value, unit=unit, mtu=mtu, kernel="6.1.0-18-amd64")
    base.update(kw)
    return Row(**base)


def run_rows(modes=("host-gw", "ipip"), rounds=3, rtt=None, gbit=None) -> list[Row]:
    """Rows like an experiment writes: per round, mode and scenario an RTT and a rate."""
    rtt = rtt or {"host-gw": [0.040, 0.045, 0.090], "ipip": [0.050, 0.055, 0.052]}
    gbit = gbit or {"host-gw": [20.0, 22.0, 21.0], "ipip": [17.0, 18.0, 16.0]}
    out = []
    for rnd in range(1, rounds + 1):
        for m in modes:
            dp = "kernel"
            out.append(row(m, "pod-cross-node", "rtt_p50", rtt[m][rnd - 1], "ms", rnd, dp))
            out.append(row(m, "pod-cross-node", "tcp_throughput", gbit[m][rnd - 1], "Gbit/s", rnd, dp,
                           mtu=1480 if m == "ipip" else 1500))
            out.append(row(m, "pod-cross-node", "tcp_retransmits", 10 * rnd, "count", rnd, dp))
    for m in modes:
        out.append(row(m, "lifecycle", "cluster_up", 1.5, "s", 0, src="", dst="", mtu=None))
    return out


def write(path: Path, rows: list[Row]) -> Path:
    with CsvWriter(path) as w:
        for r in rows:
            w.write(r)
    return path


# ------------------------------------------------------------------------ schema and round trip

def test_columns_are_the_documented_schema():
    assert COLUMNS == ["run_id", "timestamp", "experiment", "topology", "mode", "datapath", "scenario",
                       "src", "dst", "round", "metric", "value", "unit", "mtu", "kernel", "load1", "steal", "pin"]
    assert [f for f in Row.__dataclass_fields__] == COLUMNS
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for c in COLUMNS:                      # documented where a reader looks: the Row and the README
        assert f"``{c}``" in Row.__doc__ and f"`{c}`" in readme, c


def test_round_trip_keeps_every_field(tmp_path):
    rows = run_rows() + [
        row(value=0.1 + 0.2),                                     # full float precision
        row(src='pod "a", the first', dst="b\nc"),               # quoting
        row(metric="tcp_retransmits", value=3263, unit="count"),  # int in, float out
        row(metric="rtt_p99", value=float("nan")),
    ]
    back = read_rows(write(tmp_path / "r.csv", rows))
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        if math.isnan(a.value):
            assert math.isnan(b.value) and a.metric == b.metric
        else:
            assert a == b
    assert back[-4].value == 0.1 + 0.2
    assert isinstance(back[-2].value, float) and back[-2].value == 3263.0
    assert back[0].mtu == 1500 and back[-5].mtu is None and isinstance(back[0].round, int)


def test_writer_writes_the_header_at_once_and_flushes_each_row(tmp_path):
    path = tmp_path / "sub" / "live.csv"
    with CsvWriter(path) as w:
        assert path.read_text().splitlines() == [",".join(COLUMNS)]
        w.write(row())
        assert len(path.read_text().splitlines()) == 2      # readable while the run goes on
    assert read_rows(path) == [row()]


def test_writer_refuses_a_known_metric_in_another_unit(tmp_path):
    with CsvWriter(tmp_path / "u.csv") as w:
        with pytest.raises(K8sNetLabError, match="tcp_throughput.*Gbit/s"):
            w.write(row(metric="tcp_throughput", value=17.1, unit="Gbps"))
        w.write(row(metric="my_new_metric", value=1, unit="widgets"))   # unknown: free


def test_row_coerces_types():
    r = row(rnd="2", value="0.5", mtu="1450")
    assert (r.round, r.value, r.mtu) == (2, 0.5, 1450)


# ------------------------------------------------------------------------ bad files

def _one_line_error(path: Path) -> str:
    with pytest.raises(K8sNetLabError) as e:
        read_rows(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file(tmp_path):
    assert "no such file" in _one_line_error(tmp_path / "nope.csv")


def test_empty_file(tmp_path):
    (tmp_path / "e.csv").write_text("")
    assert "empty" in _one_line_error(tmp_path / "e.csv")


def test_other_csv_names_the_missing_columns(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("run_id,mode,value\nx,host-gw,1\n")
    msg = _one_line_error(path)
    assert "not a k8snetlab results CSV" in msg
    for c in ("timestamp", "scenario", "metric", "unit", "mtu", "kernel"):
        assert c in msg
    assert "missing columns" in msg and "run_id" not in msg.split("missing columns")[1]


def test_yaml_is_not_a_results_csv(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("name: x\nnodes: []\n")
    assert "missing columns" in _one_line_error(path)


@pytest.mark.parametrize("content", [b"\x00\x01 binary \xff", b"run_id,\x00timestamp\n",
                                     "caf\u00e9".encode("latin-1")])
def test_binary_file(tmp_path, content):
    path = tmp_path / "bin.csv"
    path.write_bytes(content)
    _one_line_error(path)


def test_bad_value_names_the_line(tmp_path):
    path = write(tmp_path / "v.csv", [row(), row()])
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(",0.05,", ",fast,")
    path.write_text("\n".join(lines) + "\n")
    msg = _one_line_error(path)
    assert f"{path}:3" in msg and "'value'" in msg and "'fast'" in msg


def test_short_row_names_the_line(tmp_path):
    path = write(tmp_path / "s.csv", [row()])
    path.write_text(path.read_text() + "a,b,c\n")
    assert f"{path}:3: expected 18 fields, found 3" in _one_line_error(path)


def test_directory_is_not_a_file(tmp_path):
    _one_line_error(tmp_path)


def test_extra_columns_and_other_order_are_read(tmp_path):
    path = tmp_path / "wide.csv"
    cols = list(reversed(COLUMNS)) + ["note"]
    r = row()
    cells = {c: "" if getattr(r, c) is None else str(getattr(r, c)) for c in COLUMNS}
    path.write_text(",".join(cols) + "\n" + ",".join([cells[c] for c in reversed(COLUMNS)] + ["hi"]) + "\n")
    assert read_rows(path) == [r]


# ------------------------------------------------------------------------ statistics and tables

def test_median():
    assert results.median([3, 1, 2]) == 2
    assert results.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert math.isnan(results.median([1.0, float("nan")]))
    with pytest.raises(ValueError):
        results.median([])


def test_summarize_medians_per_group_and_mode():
    rows = run_rows()
    table = results.summarize(rows, modes=["ipip", "host-gw", "bridge"], skip_scenarios=("lifecycle",))
    by_metric = {t["metric"]: t for t in table}
    assert set(by_metric) == {"rtt_p50", "tcp_throughput", "tcp_retransmits"}
    assert by_metric["rtt_p50"]["host-gw"] == 0.045          # one slow round does not move it
    assert by_metric["rtt_p50"]["ipip"] == 0.052
    assert by_metric["tcp_throughput"]["host-gw"] == 21.0
    assert by_metric["tcp_throughput"]["bridge"] is None
    assert list(by_metric["rtt_p50"]) == ["scenario", "metric", "unit", "ipip", "host-gw", "bridge"]


def test_summarize_can_split_datapaths():
    rows = [row("ipip", datapath="kernel", value=0.05), row("ipip", datapath="ebpf", value=0.03)]
    assert results.summarize(rows)[0]["ipip"] == pytest.approx(0.04)       # pooled
    split = results.summarize(rows, by=("datapath", "scenario", "metric", "unit"))
    assert [(s["datapath"], s["ipip"]) for s in split] == [("kernel", 0.05), ("ebpf", 0.03)]
    with pytest.raises(ValueError, match="unknown column"):
        results.summarize(rows, by=("speed",))


def test_ratio_table():
    table = results.ratio_table(run_rows(), numerator_mode="ipip", denominator_mode="host-gw")
    by_metric = {t["metric"]: t for t in table}
    assert "cluster_up" not in by_metric                       # lifecycle rows are skipped
    tp = by_metric["tcp_throughput"]
    assert (tp["scenario"], tp["unit"], tp["numerator"], tp["denominator"]) == \
        ("pod-cross-node", "Gbit/s", 17.0, 21.0)
    assert tp["ratio"] == pytest.approx(17 / 21)
    assert by_metric["rtt_p50"]["ratio"] == pytest.approx(0.052 / 0.045)


def test_ratio_table_missing_mode_or_zero():
    rows = [row("ipip", metric="tcp_retransmits", value=5, unit="count"),
            row("host-gw", metric="tcp_retransmits", value=0, unit="count"),
            row("ipip", metric="rtt_p50", value=0.05)]
    t = {r["metric"]: r for r in results.ratio_table(rows, "ipip", "host-gw")}
    assert t["tcp_retransmits"]["ratio"] is None            # no division by zero
    assert t["rtt_p50"]["denominator"] is None and t["rtt_p50"]["ratio"] is None


def test_compare_with_a_mode_missing_in_one_file(tmp_path):
    a = write(tmp_path / "a.csv", run_rows())
    b_rows = run_rows(modes=("host-gw",), rtt={"host-gw": [0.030, 0.036, 0.034]},
                      gbit={"host-gw": [25.0, 23.0, 24.0]})
    b_rows.append(row("bridge", "pod-same-node", "rtt_p50", 0.02, "ms"))
    b = write(tmp_path / "b.csv", b_rows)
    out = results.compare(read_rows(a), read_rows(b))
    got = {(r["mode"], r["scenario"], r["metric"]): r for r in out}

    hg = got[("host-gw", "pod-cross-node", "rtt_p50")]
    assert (hg["a"], hg["b"], hg["n_a"], hg["n_b"]) == (0.045, 0.034, 3, 3)
    assert hg["ratio"] == pytest.approx(0.034 / 0.045)
    assert got[("host-gw", "pod-cross-node", "tcp_throughput")]["ratio"] == pytest.approx(24 / 21)

    only_a = got[("ipip", "pod-cross-node", "tcp_throughput")]
    assert (only_a["a"], only_a["b"], only_a["n_b"], only_a["ratio"]) == (17.0, None, 0, None)
    only_b = got[("bridge", "pod-same-node", "rtt_p50")]
    assert (only_b["a"], only_b["b"], only_b["ratio"]) == (None, 0.02, None)
    assert out[-1] is only_b                                   # A's order first, B's extras last
    assert set(out[0]) >= {"mode", "datapath", "scenario", "metric", "unit", "a", "b", "ratio"}


def test_compare_command_end_to_end(tmp_path):
    a = write(tmp_path / "a.csv", run_rows())
    b = write(tmp_path / "b.csv", run_rows(modes=("host-gw",)))
    p = subprocess.run([sys.executable, "-m", "k8snetlab.cli", "compare", str(a), str(b)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert any(re.search(r"ipip .*tcp_throughput .*Gbit/s +3 +17 +0 +- +- +only in", ln) for ln in lines), p.stdout
    assert any(re.search(r"host-gw .*rtt_p50 .*ms .*1\.0\d* \[.*\] +no significant change$", ln)
               for ln in lines), p.stdout


def test_compare_command_bad_file_is_one_line_and_bad_input(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    p = subprocess.run([sys.executable, "-m", "k8snetlab.cli", "compare", str(path), str(path)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
    assert str(path) in p.stderr and "missing columns" in p.stderr


# ------------------------------------------------------------------------ formatting

def test_format_table_aligns_and_formats():
    text = results.format_table(
        ["scenario", "metric", "host-gw", "ipip", "ipip/host-gw", "n"],
        [["pod-cross-node", "rtt_p50", 0.045123, 0.052, 1.15238, 3],
         ["pod-cross-node", "tcp_throughput", 21.04567, None, None, 12],
         ["node-to-node", "tcp_retransmits", 3263.5, 123456.0, 0.98765, 100]])
    lines = text.splitlines()
    assert lines[0].split() == ["scenario", "metric", "host-gw", "ipip", "ipip/host-gw", "n"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["pod-cross-node", "rtt_p50", "0.04512", "0.052", "1.15", "3"]
    assert lines[3].split() == ["pod-cross-node", "tcp_throughput", "21.05", "-", "-", "12"]
    assert lines[4].split() == ["node-to-node", "tcp_retransmits", "3264", "123456", "0.988", "100"]
    assert len({len(ln) for ln in lines[:2]}) == 1
    # numbers are right-aligned: the last digit of every number column lines up
    col_end = lines[0].index("host-gw") + len("host-gw")
    assert all(ln[col_end - 1] != " " for ln in lines[2:])


def test_format_number():
    f = results.format_number
    assert [f(None), f(0.0), f(7), f(float("nan")), f("x")] == ["-", "0", "7", "nan", "x"]
    assert f(1.23456, ratio=True) == "1.23" and f(0.0001234) == "0.0001234"
    assert f(17108716770.77) == "17108716771"


def test_run_id_and_kernel():
    a, b = results.new_run_id(), results.new_run_id()
    assert a != b and re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", a)
    assert results.kernel_release() == os.uname().release
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", results.utc_timestamp())


# ------------------------------------------------------------------------ plot

def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = results.plot(run_rows(), tmp_path / "plots" / "run.png")
    assert out == tmp_path / "plots" / "run.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_returns_none(tmp_path, monkeypatch, caplog):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)           # import now raises ImportError
    assert results.plot(run_rows(), tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()
    assert "pip install matplotlib" in caplog.text


def test_plot_with_nothing_to_plot(tmp_path):
    pytest.importorskip("matplotlib")
    assert results.plot([row(metric="cluster_up", unit="s", scenario="lifecycle")],
                        tmp_path / "p.png") is None


def test_a_file_from_before_the_load_columns_is_still_read(tmp_path):
    path = tmp_path / "old.csv"
    old = COLUMNS[:15]
    path.write_text(",".join(old) + "\n" + ",".join(row().cells()[:15]) + "\n")
    (r,) = read_rows(path)
    assert r.load1 is None and r.steal is None and r.metric == row().metric
