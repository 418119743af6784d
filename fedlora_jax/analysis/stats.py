"""Statistics of a reproduction: mean ± std over seeds, paired differences against a baseline
with a Student-t confidence interval, and the verdict on a claim.

Pure Python (no scipy at runtime): Student's t CDF through the regularized incomplete beta
function (Lentz's continued fraction, Numerical Recipes §6.4), its quantile by bisection.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

VERDICTS = ("supported", "not supported", "inconclusive")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1; NaN for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        + a * math.log(x) + b * math.log1p(-x)
    )  # fmt: skip
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom: the tail P(T > |t|) is
    I_x(df/2, 1/2)/2 with x = df/(df + t²), or (1 − I_{1−x}(1/2, df/2))/2 where x is near 1
    (small |t|: there x itself rounds to 1)."""
    x = df / (df + t * t)
    if x < 0.5:
        tail = 0.5 * betainc(df / 2.0, 0.5, x)
    else:
        tail = 0.5 * (1.0 - betainc(0.5, df / 2.0, t * t / (df + t * t)))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with ``t_cdf(t, df) = p`` (0 < p < 1), by bisection to float precision."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p={p} must be in (0, 1)")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class PairedCI:
    """The paired differences d_i = a_i − b_i: n, mean, std (ddof=1) and the two-sided
    ``confidence`` interval mean ± t_{(1+c)/2, n−1} · std / √n (NaN bounds when n < 2)."""

    n: int
    mean: float
    std: float
    lo: float
    hi: float
    confidence: float

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def paired_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedCI:
    """Paired-t interval of mean(a − b); ``a`` and ``b`` are matched by position (seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired_ci: {len(a)} values against {len(b)}; pairs must match")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, std = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return PairedCI(n, mean, std, math.nan, math.nan, confidence)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return PairedCI(n, mean, std, mean - half, mean + half, confidence)


def verdict(ci: PairedCI, better: str) -> str:
    """A claim "method better than baseline", with ``ci`` of method − baseline and ``better``
    "lower" (loss) or "higher" (ROUGE-L): supported when the interval excludes 0 on the better
    side, not supported when it excludes 0 on the other, inconclusive otherwise (or n < 2)."""
    if better not in ("lower", "higher"):
        raise ValueError(f"verdict: better={better!r}; allowed: lower, higher")
    if not ci.excludes_zero():
        return "inconclusive"
    favours = ci.hi < 0 if better == "lower" else ci.lo > 0
    return "supported" if favours else "not supported"
