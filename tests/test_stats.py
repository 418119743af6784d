"""The reproduction's statistics against a textbook example and scipy.stats."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from fedlora_jax.analysis.stats import (
    PairedCI,
    mean_std,
    paired_ci,
    t_cdf,
    t_quantile,
    verdict,
)

# Student (1908) / Cushny & Peebles: extra hours of sleep under two drugs, 10 patients (R's
# `sleep`). R: t.test(extra ~ group, data = sleep, paired = TRUE) gives mean difference -1.58,
# t = -4.0621, df = 9, 95 % CI [-2.4598858, -0.7001142].
DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_ci_on_students_sleep_data() -> None:
    ci = paired_ci(DRUG_1, DRUG_2)
    assert ci.n == 10
    assert ci.mean == pytest.approx(-1.58, abs=1e-12)
    assert ci.mean / (ci.std / math.sqrt(10)) == pytest.approx(-4.0621, abs=5e-5)
    assert ci.lo == pytest.approx(-2.4598858, abs=5e-7)
    assert ci.hi == pytest.approx(-0.7001142, abs=5e-7)
    assert verdict(ci, "lower") == "supported"  # drug 1 gives less extra sleep
    assert verdict(ci, "higher") == "not supported"


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157), (30, 2.042272)],
)
def test_t_quantile_matches_the_printed_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-7)


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 29, 200, 2.5])
def test_t_distribution_matches_scipy(df: float) -> None:
    for t in (-30.0, -4.0, -1.3, -0.2, 0.0, 0.7, 2.1, 9.0):
        assert t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), abs=1e-12)
    for p in (0.001, 0.05, 0.3, 0.5, 0.9, 0.975, 0.995):
        assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9, abs=1e-10)


def test_paired_ci_matches_scipy_on_random_pairs() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        a, b = rng.normal(size=n), rng.normal(size=n) + 0.3
        ci = paired_ci(a.tolist(), b.tolist(), confidence=0.9)
        d = a - b
        lo, hi = scipy_stats.t.interval(0.9, n - 1, loc=d.mean(), scale=scipy_stats.sem(d))
        assert (ci.lo, ci.hi) == pytest.approx((lo, hi), abs=1e-10)
        assert scipy_stats.ttest_rel(a, b).statistic == pytest.approx(
            ci.mean / (ci.std / math.sqrt(n)), rel=1e-10
        )


def test_mean_std_is_the_sample_std() -> None:
    values = [2.0, 4.0, 4.0, 5.0]
    mean, std = mean_std(values)
    assert mean == 3.75 and std == pytest.approx(np.std(values, ddof=1), abs=1e-15)
    assert math.isnan(mean_std([1.0])[1]) and math.isnan(mean_std([])[0])


def test_verdicts() -> None:
    def ci(lo: float, hi: float) -> PairedCI:
        return PairedCI(3, (lo + hi) / 2, 1.0, lo, hi, 0.95)

    assert verdict(ci(-0.3, -0.1), "lower") == "supported"
    assert verdict(ci(0.1, 0.3), "lower") == "not supported"
    assert verdict(ci(-0.1, 0.3), "lower") == "inconclusive"
    assert verdict(ci(0.1, 0.3), "higher") == "supported"
    one = paired_ci([1.0], [0.0])  # one seed: no interval
    assert math.isnan(one.lo) and verdict(one, "lower") == "inconclusive"
    with pytest.raises(ValueError, match="better='up'; allowed: lower, higher"):
        verdict(ci(0, 1), "up")
    with pytest.raises(ValueError, match="3 values against 2"):
        paired_ci([1, 2, 3], [1, 2])
