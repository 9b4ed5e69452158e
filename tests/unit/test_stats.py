"""Statistics: intervals of known samples, the paired bootstrap, verdicts, formatting (no root)."""

import math

import pytest

from k8snetlab import stats


def test_t_interval_of_a_known_sample():
    s = stats.describe([1, 2, 3, 4, 5])
    assert (s.n, s.median, s.mean) == (5, 3, 3)
    assert s.sd == pytest.approx(math.sqrt(2.5))
    # t(0.975, 4) = 2.776: 3 -+ 2.776 * 1.5811 / sqrt(5)
    assert s.ci_low == pytest.approx(1.0368, abs=1e-3)
    assert s.ci_high == pytest.approx(4.9632, abs=1e-3)
    assert s.cv_pct == pytest.approx(52.7, abs=0.1)


def test_t_quantile_beyond_the_table_is_close_to_the_true_value():
    assert stats.t975(40) == pytest.approx(2.021, abs=2e-3)
    assert stats.t975(120) == pytest.approx(1.980, abs=2e-3)
    with pytest.raises(ValueError):
        stats.t975(0)


def test_one_value_gives_a_collapsed_interval_and_bad_values_are_refused():
    s = stats.describe([7.0])
    assert (s.n, s.sd, s.ci_low, s.ci_high) == (1, 0.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        stats.describe([])
    with pytest.raises(ValueError):
        stats.describe([1.0, math.nan])


def test_paired_bootstrap_cancels_drift_that_hits_both_modes_alike():
    # the machine drifts a lot from round to round; B is always 0.9 x A in the same round
    den = [10.0, 14.0, 7.0, 12.0, 9.0, 15.0]
    num = [0.9 * x for x in den]
    paired = stats.paired_ratio(num, den)
    assert paired.value == pytest.approx(0.9)
    assert paired.ci_low == pytest.approx(0.9) and paired.ci_high == pytest.approx(0.9)
    unpaired = stats.unpaired_ratio(num, den)
    assert unpaired.ci_high - unpaired.ci_low > 0.2     # the same data, pairing ignored
    assert unpaired.contains(0.9)


def test_paired_bootstrap_is_seeded_and_covers_the_ratio():
    den = [10.0, 10.4, 9.7, 10.1, 9.9, 10.3, 10.0, 9.8]
    num = [9.1, 9.6, 8.6, 9.3, 9.0, 9.2, 9.4, 8.8]
    a = stats.paired_ratio(num, den, seed=5)
    b = stats.paired_ratio(num, den, seed=5)
    c = stats.paired_ratio(num, den, seed=6)
    assert a == b
    assert a != c
    assert a.ci_low < a.value < a.ci_high
    assert 0.88 < a.ci_low and a.ci_high < 0.94
    with pytest.raises(ValueError):
        stats.paired_ratio([1, 2], [1, 2, 3])


def test_verdicts_say_met_only_when_the_whole_interval_is_on_the_right_side():
    assert stats.verdict(0.90, 0.96, low=0.85) == "met"
    assert stats.verdict(0.80, 0.84, low=0.85) == "MISSED"
    assert stats.verdict(0.83, 0.90, low=0.85) == "inconclusive"
    assert stats.verdict(0.97, 1.03, low=0.95, high=1.05) == "met"
    assert stats.verdict(1.02, 1.08, low=0.95, high=1.05) == "inconclusive"
    assert stats.verdict(1.06, 1.08, low=0.95, high=1.05) == "MISSED"
    assert stats.verdict(3, 4, high=5) == "met"
    with pytest.raises(ValueError):
        stats.verdict(1, 2)


def test_impossible_values_are_flagged():
    # a latency added below zero by more than its interval: noise
    assert stats.impossible(-60, -20, low=0)
    assert not stats.impossible(-20, 15, low=0)
    # a ClusterIP faster than the pod IP it forwards to: ratio above 1 beyond the interval
    assert stats.impossible(1.1, 1.3, high=1.0)


def test_formatting():
    assert stats.fmt_ci(0.9312, 0.9021, 0.9634) == "0.931 [0.902, 0.963]"
    assert stats.fmt_ci(0.93, 0.90, 0.96, digits=2) == "0.93 [0.90, 0.96]"
    assert stats.fmt_ci(25.13, 21.6, 28.0) == "25.1 [21.6, 28.0]"
    r = stats.Ratio(1.0, 1.0, 1.0, 3)
    assert stats.fmt_ratio(r) == "1.00 [1.00, 1.00]"


def test_median_difference_interval_covers_the_shift_and_is_seeded():
    a = [100 + (k % 7) for k in range(200)]
    b = [80 + (k % 7) for k in range(200)]
    d = stats.median_difference(a, b, seed=2)
    assert d.mean == 20 and d.ci_low <= 20 <= d.ci_high and d.ci_high - d.ci_low < 4
    assert d == stats.median_difference(a, b, seed=2)
