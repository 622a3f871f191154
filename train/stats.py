"""Statistics over seeds, without scipy: Student-t quantiles, intervals for a mean, paired and Welch
differences, and a percentile bootstrap.

The t-interval is the default everywhere: with few seeds (2-5) it is exact when the seed-to-seed noise
is normal. A percentile bootstrap of the mean undercovers badly at small n (with n=3 there are only 10
distinct resampled means; tests/test_stats.py measures its coverage), so it is offered for n >= 10 and
skewed metrics, not for three seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

LEVEL = 0.95
BOOTSTRAP_SAMPLES = 10000
METHODS = ("t", "bootstrap")


# ---- the Student t distribution ---------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz evaluation)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (> 0, not necessarily integer) degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on t_cdf; |error| < 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if df <= 0 or not math.isfinite(df):
        raise ValueError(f"degrees of freedom must be positive and finite, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-10 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---- estimates ---------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """A mean (or a mean difference) over seeds with its interval. `lo`/`hi` are None when n is too small
    for an interval (n < 2); `method` says how it was computed."""

    n: int
    mean: float
    std: float | None
    lo: float | None
    hi: float | None
    method: str
    df: float | None = None

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2

    @property
    def excludes_zero(self) -> bool:
        return self.lo is not None and (self.lo > 0 or self.hi < 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci95"] = None if self.lo is None else [self.lo, self.hi]
        del d["lo"], d["hi"]
        return d


def _clean(values: Sequence[float]) -> np.ndarray:
    a = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"non-finite value among {list(values)}")
    return a


def _std(a: np.ndarray) -> float | None:
    return float(a.std(ddof=1)) if len(a) > 1 else None


def _bootstrap(stat, samples: list[np.ndarray], level: float, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, len(s), size=(BOOTSTRAP_SAMPLES, len(s))) for s in samples]
    draws = stat(*[s[i] for s, i in zip(samples, idx)])
    q = (1 - level) / 2
    return float(np.quantile(draws, q)), float(np.quantile(draws, 1 - q))


def mean_interval(values: Sequence[float], method: str = "t", level: float = LEVEL, seed: int = 0) -> Estimate:
    """Mean of `values` with a `level` interval: Student t (n-1 df) or a percentile bootstrap."""
    _check_method(method)
    a = _clean(values)
    if len(a) == 0:
        raise ValueError("no values")
    mean, std = float(a.mean()), _std(a)
    if len(a) < 2:
        return Estimate(len(a), mean, std, None, None, "none (n=1)")
    if method == "bootstrap":
        lo, hi = _bootstrap(lambda x: x.mean(axis=1), [a], level, seed)
        return Estimate(len(a), mean, std, lo, hi, "bootstrap")
    half = t_quantile(0.5 + level / 2, len(a) - 1) * std / math.sqrt(len(a))
    return Estimate(len(a), mean, std, mean - half, mean + half, "t", float(len(a) - 1))


def paired_difference(
    values: Sequence[float], baseline: Sequence[float], method: str = "t", level: float = LEVEL, seed: int = 0
) -> Estimate:
    """Mean of values[i] - baseline[i] (same seeds, same order) with its interval."""
    a, b = _clean(values), _clean(baseline)
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    est = mean_interval(a - b, method, level, seed)
    est.method = f"paired {est.method}"
    return est


def welch_difference(
    values: Sequence[float], baseline: Sequence[float], method: str = "t", level: float = LEVEL, seed: int = 0
) -> Estimate:
    """mean(values) - mean(baseline) for independent samples: Welch's t (Welch-Satterthwaite df), or a
    two-sample percentile bootstrap."""
    _check_method(method)
    a, b = _clean(values), _clean(baseline)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("no values")
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Estimate(min(len(a), len(b)), diff, None, None, None, f"none (n={len(a)} and {len(b)})")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    n = min(len(a), len(b))
    if method == "bootstrap":
        lo, hi = _bootstrap(lambda x, y: x.mean(axis=1) - y.mean(axis=1), [a, b], level, seed)
        return Estimate(n, diff, None, lo, hi, "two-sample bootstrap")
    if se == 0.0:
        return Estimate(n, diff, 0.0, diff, diff, "Welch t", float(len(a) + len(b) - 2))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return Estimate(n, diff, None, diff - half, diff + half, "Welch t", float(df))


def difference(
    values: dict, baseline: dict, method: str = "t", level: float = LEVEL, seed: int = 0
) -> tuple[Estimate, list]:
    """values, baseline: {seed: value}. Paired over the common seeds when there are at least two (same seed
    = same data order), Welch (independent samples) otherwise. Returns (estimate, paired seeds or [])."""
    common = sorted(set(values) & set(baseline), key=str)
    if len(common) >= 2:
        return paired_difference(
            [values[s] for s in common], [baseline[s] for s in common], method, level, seed
        ), common
    return welch_difference(list(values.values()), list(baseline.values()), method, level, seed), []


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown interval method {method!r}; choose one of {', '.join(METHODS)}")
