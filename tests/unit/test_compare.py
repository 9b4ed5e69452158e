"""``k8snetlab compare``: ratios with intervals, verdicts, refusals, pipes (no root)."""

import subprocess
import sys
from pathlib import Path

import pytest

from k8snetlab import compare, results
from k8snetlab.results import Row

REPO = Path(__file__).resolve().parents[2]


def rows(experiment="hostgw_vs_ipip", gbit=(20.0, 21.0, 19.5, 20.5), rtt=(0.05, 0.052, 0.049, 0.051)):
    out = []
    for k, (g, r) in enumerate(zip(gbit, rtt), start=1):
        for metric, value, unit in (("tcp_throughput", g, "Gbit/s"), ("rtt_p50", r, "ms"),
                                    ("tcp_retransmits", 0, "count"), ("cpu_per_gbit", 0.01 * g / 20, "s/Gbit")):
            out.append(Row(run_id="r", timestamp="2026-11-30T03:00:00Z", experiment=experiment, topology="t",
                           mode="host-gw", datapath="kernel", scenario="pod-cross-node", src="a", dst="b",
                           round=k, metric=metric, value=value, unit=unit, mtu=1450, kernel="k"))
    out.append(Row(run_id="r", timestamp="2026-11-30T03:00:00Z", experiment=experiment, topology="t",
                   mode="host-gw", datapath="kernel", scenario="lifecycle", src="", dst="", round=0,
                   metric="cluster_up", value=2.5, unit="s", mtu=None, kernel="k"))
    return out


def write(path, rs):
    with results.CsvWriter(path) as w:
        for r in rs:
            w.write(r)
    return path


def test_a_run_compared_with_itself_shows_no_significant_change_anywhere():
    entries = compare.compare(rows(), rows())
    assert entries and {e.verdict for e in entries} == {compare.NO_CHANGE}


def test_faster_and_slower_follow_the_metric_direction():
    b = rows(gbit=(25.0, 26.0, 24.5, 25.5), rtt=(0.07, 0.072, 0.069, 0.071))
    got = {e.key[3]: e for e in compare.compare(rows(), b)}
    assert got["tcp_throughput"].verdict == "faster"
    assert got["tcp_throughput"].ratio.contains(1.25)
    assert got["rtt_p50"].verdict == "slower"
    assert got["cpu_per_gbit"].verdict == "slower"       # more CPU per gigabit
    assert got["tcp_retransmits"].verdict == compare.NO_CHANGE


def test_noise_larger_than_the_change_is_no_significant_change():
    b = rows(gbit=(21.0, 18.0, 23.0, 20.0))
    got = {e.key[3]: e for e in compare.compare(rows(), b)}
    assert got["tcp_throughput"].verdict == compare.NO_CHANGE


def test_mixed_experiments_and_empty_files_are_refused():
    with pytest.raises(results.ResultsFileError, match="same experiment"):
        compare.compare(rows(), rows(experiment="cni_modes"))
    with pytest.raises(results.ResultsFileError, match="only a header"):
        compare.compare([], rows())


def cli(*args):
    return subprocess.run([sys.executable, "-m", "k8snetlab.cli", "compare", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_refusals_are_one_line_exit_2(tmp_path):
    a = write(tmp_path / "a.csv", rows())
    other = write(tmp_path / "o.csv", rows(experiment="cni_modes"))
    header_only = write(tmp_path / "h.csv", [])
    for b, word in ((other, "same experiment"), (header_only, "only a header")):
        p = cli(a, b)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and word in p.stderr, p.stderr


def test_cli_survives_a_closed_pipe(tmp_path):
    import dataclasses
    # > a pipe buffer of output; one value per key, so no bootstrap slows the test down
    many = [dataclasses.replace(r, mode=f"m{k}") for k in range(150) for r in rows() if r.round <= 1]
    a = write(tmp_path / "a.csv", many)
    p = subprocess.run(f"{sys.executable} -m k8snetlab.cli compare {a} {a} | head -2", shell=True, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert len(p.stdout.splitlines()) == 2


def test_a_different_cpu_placement_is_named():
    from k8snetlab import compare as cmp, results as res

    def row(pin):
        return res.Row("r", "t", "e", "lab", "host-gw", "", "x", "a", "b", 1, "tcp_throughput", 1.0, "Gbit/s",
                       1500, "k", pin=pin)
    assert cmp.placement_note([row("same:0")], [row("same:0")]) is None
    assert "--pin same:0 in A and none in B" in cmp.placement_note([row("same:0")], [row(None)])
