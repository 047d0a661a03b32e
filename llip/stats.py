"""Small-sample statistics for comparing training runs over seeds: mean, standard deviation and the 95% interval of
a mean (Student's t), used by ``llip compare --seeds N``.

A paired difference (model A minus model B trained with the same seed, so the same data order and tower
initialisation) removes the part of the seed-to-seed spread that the two runs share; its interval is the interval of
the mean of the per-seed differences.
"""

from __future__ import annotations

import math
import statistics

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1 .. 30 (beyond: the normal 1.96 is within 2%).
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}``: the half-width of a 95% interval is this times the standard error."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return T_975[df - 1] if df <= len(T_975) else 1.96


def describe(values: list[float]) -> dict:
    """``{"n", "mean", "sd", "ci95": [low, high]}``; ``sd`` and ``ci95`` are None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to describe")
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None}
    sd = statistics.stdev(values)
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """:func:`describe` of ``a[s] - b[s]`` over the seeds ``s`` both have, plus ``"significant"``: whether the 95%
    interval excludes 0. None when they share fewer than two seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    out = describe([a[s] - b[s] for s in seeds])
    low, high = out["ci95"]
    out["significant"] = low > 0 or high < 0
    return out


def linear_trend(xs: list[float], ys: list[float]) -> dict | None:
    """Least-squares slope of ``ys`` on ``xs`` with its 95% interval (Student's t, ``n - 2`` degrees of freedom) and
    whether the interval excludes 0: ``{"n", "slope", "ci95", "significant"}``; None with fewer than three points or
    a single distinct x. Each (x, y) is one run, so seeds are the replicates."""
    n = len(xs)
    if n != len(ys):
        raise ValueError(f"xs and ys differ in length ({n} vs {len(ys)})")
    if n < 3 or len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    half = t_quantile_975(n - 2) * math.sqrt(residual / (n - 2) / sxx)
    low, high = slope - half, slope + half
    return {"n": n, "slope": slope, "ci95": [low, high], "significant": low > 0 or high < 0}
