"""train.stats: Student-t quantiles against the printed tables, the intervals' formulas, and their
coverage measured by simulation (the t-interval holds 95% at n=3; a percentile bootstrap does not)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pelab.train import stats

# Two-sided 95% critical values t_{0.975, df} as printed in standard tables.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 29: 2.045, 30: 2.042, 120: 1.980}


@pytest.mark.parametrize("df,expected", sorted(T975.items()))
def test_t_quantile_matches_the_tables(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=6e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-expected, abs=6e-4)


def test_t_distribution_limits_and_identities():
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # -> normal
    assert stats.t_quantile(0.95, 2) == pytest.approx(2.919986, abs=1e-5)
    assert stats.t_cdf(0.0, 3.7) == pytest.approx(0.5)
    # df=1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi; df=2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.4, 0.7, 5.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # non-integer df (Welch) lies between its integer neighbours
    assert stats.t_quantile(0.975, 3) > stats.t_quantile(0.975, 3.5) > stats.t_quantile(0.975, 4)
    for a, b, x in ((1, 1, 0.3), (2.5, 1, 0.6), (1, 3, 0.2)):  # closed forms of I_x(a, b)
        expected = {(1, 1): x, (2.5, 1): x**2.5, (1, 3): 1 - (1 - x) ** 3}[(a, b)]
        assert stats.betainc(a, b, x) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="quantile level"):
        stats.t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_quantile(0.9, 0)


def test_mean_interval_formula_and_small_n():
    x = [2.50, 2.56, 2.53]
    e = stats.mean_interval(x)
    s = float(np.std(x, ddof=1))
    half = 4.30265273 * s / math.sqrt(3)
    assert (e.n, e.method, e.df) == (3, "t", 2.0)
    assert e.mean == pytest.approx(2.53) and e.std == pytest.approx(s)
    assert (e.lo, e.hi) == (pytest.approx(2.53 - half, abs=1e-8), pytest.approx(2.53 + half, abs=1e-8))
    assert e.to_dict()["ci95"] == [e.lo, e.hi] and e.excludes_zero  # all values are positive
    one = stats.mean_interval([2.5])
    assert one.lo is None and one.std is None and one.method == "none (n=1)" and one.to_dict()["ci95"] is None
    b = stats.mean_interval(x, "bootstrap")
    assert b.method == "bootstrap" and min(x) <= b.lo <= b.hi <= max(x)
    assert stats.mean_interval(x, "bootstrap").lo == b.lo  # seeded: the same numbers every time
    with pytest.raises(ValueError, match="unknown interval method"):
        stats.mean_interval(x, "wilson")
    with pytest.raises(ValueError, match="non-finite"):
        stats.mean_interval([1.0, float("nan")])


def test_paired_beats_welch_when_seeds_share_noise():
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 0.05, 5)  # the same data order moves both groups alike
    base = 2.60 + seed_effect + rng.normal(0, 0.002, 5)
    other = 2.59 + seed_effect + rng.normal(0, 0.002, 5)
    paired = stats.paired_difference(other, base)
    welch = stats.welch_difference(other, base)
    assert paired.method == "paired t" and welch.method == "Welch t"
    assert paired.lo <= -0.01 <= paired.hi and paired.excludes_zero
    assert welch.lo <= -0.01 <= welch.hi and not welch.excludes_zero  # the seed noise hides it without pairing
    assert paired.hi - paired.lo < (welch.hi - welch.lo) / 10
    with pytest.raises(ValueError, match="differ in length"):
        stats.paired_difference([1, 2, 3], [1, 2])


def test_welch_degrees_of_freedom():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 9.0]
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    e = stats.welch_difference(a, b)
    assert e.df == pytest.approx(df) and e.mean == pytest.approx(2.5 - 4.5)
    assert e.hi - e.mean == pytest.approx(stats.t_quantile(0.975, df) * math.sqrt(va + vb))
    assert stats.welch_difference([1.0], [2.0, 3.0]).lo is None


def test_difference_pairs_common_seeds_else_welch():
    est, paired = stats.difference({0: 1.0, 1: 1.2, 2: 1.1}, {0: 0.9, 1: 1.0, 2: 1.05, 3: 1.0})
    assert paired == [0, 1, 2] and est.method == "paired t" and est.n == 3
    assert est.mean == pytest.approx(np.mean([0.1, 0.2, 0.05]))
    est, paired = stats.difference({0: 1.0, 1: 1.2}, {5: 0.9, 6: 1.0})
    assert paired == [] and est.method == "Welch t"


def _coverage(draw, n_sims=1500, seed=0):
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(n_sims):
        est, truth = draw(rng, i)
        hits += est.lo <= truth <= est.hi
    return hits / n_sims


def test_t_intervals_cover_95_percent_at_three_seeds():
    mean = _coverage(lambda rng, i: (stats.mean_interval(rng.normal(2.5, 0.03, 3)), 2.5))
    paired = _coverage(
        lambda rng, i: (
            stats.paired_difference(
                *(lambda s: (2.49 + s + rng.normal(0, 0.01, 3), 2.5 + s + rng.normal(0, 0.01, 3)))(
                    rng.normal(0, 0.05, 3)
                )
            ),
            -0.01,
        ),
        seed=1,
    )
    welch = _coverage(
        lambda rng, i: (stats.welch_difference(rng.normal(1.0, 0.1, 3), rng.normal(0.7, 0.4, 5)), 0.3), seed=2
    )
    for cov in (mean, paired, welch):
        assert 0.925 <= cov <= 0.975, (mean, paired, welch)


def test_percentile_bootstrap_undercovers_at_three_seeds():
    """Why the t-interval is the default: at n=3 a percentile bootstrap covers about 76% (measured here:
    n=3 0.76, n=5 0.83, n=10 0.92 with 600 simulations each)."""
    cov = _coverage(lambda rng, i: (stats.mean_interval(rng.normal(0, 1, 3), "bootstrap", seed=i), 0.0), n_sims=300)
    assert cov < 0.85
