"""Means and 95% confidence intervals over a few seeds (Student t), without scipy.

With n runs of one configuration, mean +- t(0.975, n-1) * s / sqrt(n), where s is the sample
standard deviation (n - 1 in the denominator). With 3 seeds t is 4.303, so the interval is
wide: that is the honest width of a 3-seed estimate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lorafleet.errors import ConfigError

# Two-sided 95% quantiles t(0.975, df) of Student's t, df = 1..30 (standard tables; the test
# recomputes them by integrating the density). Beyond 30 the normal quantile is within 2%.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.960


def t975(df: int) -> float:
    if df < 1:
        raise ConfigError(f"a t interval needs at least 2 values (df >= 1), found df={df}")
    return T975[df - 1] if df <= len(T975) else Z975


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float | None  # None for a single value: no interval
    n: int
    std: float | None = None

    def __str__(self) -> str:
        if self.half_width is None:
            return f"{self.mean:.1f}"
        return f"{self.mean:.1f} ± {self.half_width:.1f}"


def mean_ci(values: list[float]) -> Interval:
    """Mean and the half width of its 95% Student-t interval."""
    if not values:
        raise ConfigError("mean_ci: no values")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, None, 1)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t975(n - 1) * std / math.sqrt(n), n, std)
