"""Statistics for measurements: a figure comes with its interval.

Pure functions, no I/O, no third-party packages, so every experiment, ``k8snetlab compare``
and the tests use the same arithmetic.

- :func:`describe` gives n, median, mean, standard deviation and a 95 % confidence interval
  of the mean (Student's t; with one value the interval is that value, with a flag that it
  says nothing).
- :func:`paired_ratio` is the ratio of two modes measured in the same rounds: rounds are
  paired by interleaving, so the bootstrap resamples *rounds* (both modes' values of a round
  stay together) and the interval is the 2.5/97.5 % percentiles of the resampled ratio of
  means. Seeded: the same data and seed give the same interval.
- :func:`unpaired_ratio` is the same for two independent samples (two runs, ``compare``).
- :func:`verdict` turns an interval and a target into ``met``, ``MISSED`` or
  ``inconclusive``: ``met`` only when the whole interval is on the right side.
- :func:`fmt_ci` prints ``0.93 [0.90, 0.96]``.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Sequence

BOOTSTRAP_SAMPLES = 2000
DEFAULT_SEED = 1
CONFIDENCE = 0.95

# two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (a table to 30,
    then the Cornish-Fisher expansion around the normal quantile, good to 3 decimals)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class Summary:
    """Descriptive statistics of one sample, with the 95 % t-interval of its mean."""

    n: int
    median: float
    mean: float
    sd: float
    ci_low: float
    ci_high: float

    @property
    def half_width_pct(self) -> float:
        """Half the interval's width in percent of the mean (inf when the mean is 0)."""
        if self.mean == 0:
            return math.inf
        return 100 * (self.ci_high - self.ci_low) / 2 / abs(self.mean)

    @property
    def cv_pct(self) -> float:
        """Coefficient of variation in percent (sd / mean)."""
        return math.inf if self.mean == 0 else 100 * self.sd / abs(self.mean)


def _clean(values: Sequence[float], what: str = "values") -> list[float]:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError(f"no {what}")
    if any(math.isnan(v) or math.isinf(v) for v in vals):
        raise ValueError(f"{what} contain NaN or infinity")
    return vals


def describe(values: Sequence[float]) -> Summary:
    """n, median, mean, sample standard deviation and the 95 % t-interval of the mean.
    One value: sd 0 and the interval collapses to the value (it cannot say more)."""
    vals = _clean(values)
    n = len(vals)
    mean = math.fsum(vals) / n
    if n == 1:
        return Summary(1, vals[0], mean, 0.0, mean, mean)
    sd = statistics.stdev(vals)
    half = t975(n - 1) * sd / math.sqrt(n)
    return Summary(n, statistics.median(vals), mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class Ratio:
    """A ratio of means with its bootstrap 95 % interval."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    @property
    def half_width_pct(self) -> float:
        if self.value == 0 or math.isnan(self.value):
            return math.inf
        return 100 * (self.ci_high - self.ci_low) / 2 / abs(self.value)

    def contains(self, x: float) -> bool:
        return self.ci_low <= x <= self.ci_high


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    rank = (len(sorted_vals) - 1) * q
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (rank - lo)


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def paired_ratio(num: Sequence[float], den: Sequence[float], seed: int = DEFAULT_SEED,
                 samples: int = BOOTSTRAP_SAMPLES) -> Ratio:
    """mean(num) / mean(den) for values measured in the same rounds (num[i] and den[i] are
    round i), with a paired bootstrap 95 % interval: rounds are drawn with replacement and
    both values of a drawn round go in together, so drift that hit both modes in a round
    cancels in the ratio. Seeded (``random.Random(seed)``): reproducible."""
    a, b = _clean(num, "numerator values"), _clean(den, "denominator values")
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    if _mean(b) == 0:
        raise ValueError("the denominator's mean is 0: no ratio")
    value = _mean(a) / _mean(b)
    n = len(a)
    if n == 1:
        return Ratio(value, value, value, 1)
    rng = random.Random(seed)
    boot = []
    for _ in range(samples):
        idx = [rng.randrange(n) for _ in range(n)]
        sb = math.fsum(b[i] for i in idx)
        if sb != 0:
            boot.append(math.fsum(a[i] for i in idx) / sb)
    boot.sort()
    return Ratio(value, _percentile(boot, 0.025), _percentile(boot, 0.975), n)


def unpaired_ratio(num: Sequence[float], den: Sequence[float], seed: int = DEFAULT_SEED,
                   samples: int = BOOTSTRAP_SAMPLES) -> Ratio:
    """mean(num) / mean(den) for two independent samples (two runs), bootstrap 95 %
    interval resampling each sample on its own. With one value on each side the interval
    is the ratio itself."""
    a, b = _clean(num, "numerator values"), _clean(den, "denominator values")
    if _mean(b) == 0:
        raise ValueError("the denominator's mean is 0: no ratio")
    value = _mean(a) / _mean(b)
    if len(a) == 1 and len(b) == 1:
        return Ratio(value, value, value, 1)
    rng = random.Random(seed)
    boot = []
    for _ in range(samples):
        sa = math.fsum(a[rng.randrange(len(a))] for _ in range(len(a))) / len(a)
        sb = math.fsum(b[rng.randrange(len(b))] for _ in range(len(b))) / len(b)
        if sb != 0:
            boot.append(sa / sb)
    boot.sort()
    return Ratio(value, _percentile(boot, 0.025), _percentile(boot, 0.975), min(len(a), len(b)))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Summary:
    """a[i] - b[i] per round, described (t-interval of the mean difference)."""
    x, y = _clean(a, "values"), _clean(b, "values")
    if len(x) != len(y):
        raise ValueError(f"paired samples differ in length: {len(x)} and {len(y)}")
    return describe([p - q for p, q in zip(x, y)])


MET, MISSED, INCONCLUSIVE = "met", "MISSED", "inconclusive"


def verdict(ci_low: float, ci_high: float, low: float | None = None,
            high: float | None = None) -> str:
    """``met`` when the whole interval lies inside [low, high] (either bound may be open),
    ``MISSED`` when the whole interval lies outside, ``inconclusive`` when it crosses a bound."""
    if low is None and high is None:
        raise ValueError("a target needs a lower or an upper bound")
    if ci_low > ci_high:
        raise ValueError(f"interval [{ci_low}, {ci_high}] is upside down")
    inside = (low is None or ci_low >= low) and (high is None or ci_high <= high)
    if inside:
        return MET
    outside = (low is not None and ci_high < low) or (high is not None and ci_low > high)
    return MISSED if outside else INCONCLUSIVE


def impossible(ci_low: float, ci_high: float, low: float | None = None,
               high: float | None = None) -> bool:
    """Is the whole interval outside what physics allows ([low, high])? Such a figure is
    noise (a disturbed round, a wrong baseline), never a finding."""
    return (low is not None and ci_high < low) or (high is not None and ci_low > high)


def _digits(*xs: float) -> int:
    """Decimals so that the interval's width shows in two significant digits."""
    width = abs(xs[-1] - xs[-2]) if len(xs) >= 3 else 0.0
    scale = max(abs(x) for x in xs) or 1.0
    ref = width if width > 0 else scale / 10
    return max(0, min(6, 1 - math.floor(math.log10(ref))))


def fmt_ci(value: float, low: float, high: float, digits: int | None = None) -> str:
    """``0.93 [0.90, 0.96]``; decimals follow the interval's width unless given."""
    if any(math.isnan(x) for x in (value, low, high)):
        return "nan"
    d = _digits(value, low, high) if digits is None else digits
    if abs(value) >= 1000 and d == 0:
        return f"{value:.0f} [{low:.0f}, {high:.0f}]"
    return f"{value:.{d}f} [{low:.{d}f}, {high:.{d}f}]"


def fmt_ratio(r: Ratio) -> str:
    return fmt_ci(r.value, r.ci_low, r.ci_high, digits=max(2, _digits(r.value, r.ci_low, r.ci_high)))


def median_difference(a: Sequence[float], b: Sequence[float], seed: int = DEFAULT_SEED,
                      samples: int = BOOTSTRAP_SAMPLES) -> Summary:
    """median(a) - median(b) of two independent samples (e.g. connect times at two sizes)
    with a bootstrap 95 % interval; ``Summary`` with mean = the observed difference."""
    x, y = _clean(a, "values"), _clean(b, "values")
    diff = statistics.median(x) - statistics.median(y)
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(x, k=len(x))) - statistics.median(rng.choices(y, k=len(y)))
                  for _ in range(samples))
    return Summary(min(len(x), len(y)), diff, diff, statistics.pstdev(boot),
                   _percentile(boot, 0.025), _percentile(boot, 0.975))
