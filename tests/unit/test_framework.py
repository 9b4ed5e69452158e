"""The experiment framework's pure parts: pairing by round, verdicts from intervals, the
summary, the summary CSV, adaptive-round widths (no root)."""

import csv
import random

from k8snetlab import framework, results
from k8snetlab.framework import Comparison, Experiment, Target, Variant


def mk(mode, scenario, metric, value, rnd, unit="Gbit/s"):
    return results.Row(run_id="r", timestamp="2026-11-30T03:00:00Z", experiment="t", topology="t",
                       mode=mode, datapath="", scenario=scenario, src="a", dst="b", round=rnd,
                       metric=metric, value=value, unit=unit, mtu=1500, kernel="k")


class Two(Experiment):
    name = "t"
    variants = (Variant("a", "host-gw"), Variant("b", "ipip"))
    comparisons = (Comparison("b", "a", "x", headline=True),)
    table_ratios = (("b", "a"),)


def drifting_rows(ratio=0.9, rounds=6, seed=3):
    """Both modes drift together from round to round; b is ``ratio`` x a plus a little noise."""
    rng = random.Random(seed)
    rows = []
    for k in range(1, rounds + 1):
        level = rng.uniform(5, 15)
        rows.append(mk("a", "x", "tcp_throughput", level, k))
        rows.append(mk("b", "x", "tcp_throughput", level * ratio * rng.uniform(0.99, 1.01), k))
    return rows


def test_pairs_only_rounds_both_modes_have():
    rows = [mk("a", "x", "m", 1.0, 1), mk("a", "x", "m", 2.0, 2), mk("b", "x", "m", 4.0, 2)]
    assert framework.paired(rows, "b", "a", "x", "m") == ([4.0], [2.0])


def test_paired_ratio_of_drifting_rounds_is_tight_and_contains_the_truth():
    rows = drifting_rows()
    r = framework.comparison_ratio(rows, Two.comparisons[0], seed=1)
    assert r.contains(0.9) and r.half_width_pct < 1.0
    assert framework.headline_widths(Two(), rows, seed=1)["b / a"] < 1.0


def test_a_single_round_has_infinite_width_so_adaptive_rounds_go_on():
    rows = drifting_rows(rounds=1)
    assert framework.headline_widths(Two(), rows, seed=1)["b / a"] == float("inf")


def test_a_headline_of_a_variant_the_run_left_out_does_not_hold_adaptive_rounds():
    rows = [r for r in drifting_rows() if r.mode == "a"]
    assert framework.headline_widths(Two(), rows, seed=1) == {}
    assert framework.headline_widths(Two(), drifting_rows(), seed=1)


def test_target_lines_never_say_met_when_the_interval_crosses_the_target():
    rows = drifting_rows(ratio=0.9)
    crossing = Target("b >= 0.9 x a", "ratio", "b", "a", "x", low=0.9)
    assert framework.target_line(rows, crossing, 1).split()[0] == "inconclusive"
    clear = Target("b >= 0.8 x a", "ratio", "b", "a", "x", low=0.8)
    assert framework.target_line(rows, clear, 1).split()[0] == "met"
    missed = Target("b >= 0.95 x a", "ratio", "b", "a", "x", low=0.95)
    assert framework.target_line(rows, missed, 1).split()[0] == "MISSED"
    one = Target("b >= 0.8 x a", "ratio", "b", "a", "x", low=0.8)
    assert framework.target_line(drifting_rows(rounds=1), one, 1).split()[0] == "indicative"


def test_an_impossible_difference_is_flagged_as_noise():
    rows = []
    for k in range(1, 5):
        rows.append(mk("a", "x", "rtt_p50", 0.100 + 0.001 * k, k, "ms"))
        rows.append(mk("b", "x", "rtt_p50", 0.060 + 0.001 * k, k, "ms"))
    t = Target("b adds <= 10 us", "difference", "b", "a", "x", metric="rtt_p50", high=10, scale=1000,
               possible=(0, None))
    line = framework.target_line(rows, t, 1)
    assert line.split()[0] == "noise" and "-40" in line


def test_summary_prints_intervals_and_the_ratio_column():
    text = framework.summary(Two(), drifting_rows(), seed=1)
    assert "b/a" in text and "[" in text and "0.9" in text
    assert "* b / a (x)" in text


def test_summary_csv_has_values_and_ratios(tmp_path):
    path = framework.write_summary(tmp_path / "s.csv", Two(), drifting_rows(), "r", 1)
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == framework.SUMMARY_COLUMNS
    kinds = {(g["kind"], g["mode"]) for g in got}
    assert ("value", "a") in kinds and ("ratio", "b") in kinds
    ratio = next(g for g in got if g["kind"] == "ratio")
    assert float(ratio["ci_low"]) <= 0.9 <= float(ratio["ci_high"])
    assert int(ratio["n"]) == 6


def test_quick_options_make_a_smoke_run_without_adaptive_rounds():
    p = framework.parser(Two())
    args = p.parse_args(["--quick"])
    framework.check_args(Two(), args)
    assert (args.repeat, args.ci) == (1, None)


def test_rate_options_are_checked_before_anything_is_built():
    import pytest
    from k8snetlab.errors import SpecError
    p = framework.parser(Two())
    framework.check_args(Two(), p.parse_args(["--link-rate", "1gbit", "--rate", "5G"]))
    for bad in (["--link-rate", "fast"], ["--rate", "quick"], ["--ci", "0"]):
        with pytest.raises(SpecError):
            framework.check_args(Two(), p.parse_args(bad))


def _run(tmp_path, *argv):
    from types import SimpleNamespace
    from k8snetlab import measure
    args = framework.parser(Two()).parse_args(["--out", str(tmp_path), *argv])
    args.placement = measure.placement(args.pin, 0, [0, 1])
    return framework.Run(Two(), args, SimpleNamespace(name="t"))


def test_adaptive_rounds_measure_tcp_only_and_rows_carry_the_pin(tmp_path, monkeypatch):
    from k8snetlab import experiment_script, measure
    r = _run(tmp_path)
    assert r.pin == "same:0"
    assert framework.pin_label(measure.placement("split", 0, [0, 1])) == "split:0/1"
    assert framework.pin_label(measure.NO_PLACEMENT) == "none"
    pinged = []
    monkeypatch.setattr(framework.measure, "ping",
                        lambda *a, **k: pinged.append(a) or measure.RttStats([0.05] * 50, 50, 50))
    monkeypatch.setattr(r, "tcp", lambda path, d: [("tcp_throughput", 1.0, "Gbit/s")])
    ep = experiment_script.Endpoint("a", "/proc/self/ns/net", "10.0.0.1")
    path = framework.Path2("x", ep, ep)
    full = [m for m, _, _ in r.ping_and_tcp(path, 1.0)]
    assert "rtt_p50" in full and "tcp_throughput" in full and pinged
    pinged.clear()
    r.lean = True
    assert [m for m, _, _ in r.ping_and_tcp(path, 1.0)] == ["tcp_throughput"] and not pinged
    with results.CsvWriter(r.csv_path) as w:
        r.writer = w
        r.row("a", path, 1, "tcp_throughput", 1.0, "Gbit/s", pin=r.pin)
    assert results.read_rows(r.csv_path)[0].pin == "same:0"


def test_busy_warning_counts_other_programs_not_the_runs_own_load(tmp_path):
    r = _run(tmp_path)
    r.loads, r.steals, r.baselines = [1.0, 1.46], [0.0], [0.1, 0.12, 0.1]
    text = framework.machine_lines(r)
    assert "WARNING" not in text                     # the quiet run of this morning: load 1.46 was its own
    assert "iperf3 client and server on CPU 0" in text and "median 0.10 of" in text
    r.baselines = [1.4, 1.5, 1.6]
    assert "WARNING: the machine was busy (other programs kept 1.50 of" in framework.machine_lines(r)


def test_pin_is_chosen_once_and_a_bad_cpu_is_one_clear_error(monkeypatch):
    import pytest
    from k8snetlab import experiment_script, hoststat, measure
    from k8snetlab.errors import SpecError
    p = experiment_script.parser("t")
    monkeypatch.setattr(measure, "allowed_cpus", lambda: [0, 1])
    monkeypatch.setattr(hoststat, "quietest_cpu", lambda cpus: 1)
    saved = measure.current_placement()
    try:
        args = p.parse_args([])
        assert args.pin == "same"                                   # the default
        where = experiment_script.choose_placement(args)
        assert (where.client, where.server, where.others) == (1, 1, frozenset({0}))
        assert measure.current_placement() is where and args.placement is where
        assert experiment_script.choose_placement(p.parse_args(["--pin", "none"])) == measure.NO_PLACEMENT
        with pytest.raises(SpecError, match="--pin-cpu: CPU 5 is not one this process may run on"):
            experiment_script.choose_placement(p.parse_args(["--pin-cpu", "5"]))
    finally:
        measure.set_placement(saved)
