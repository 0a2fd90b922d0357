"""Uncertainty of the figures a sweep reports: 95% bootstrap intervals over independent units, paired
differences between configurations, and the share of the oracle's headroom a policy reaches.

Every figure the report shows is a function of sums over units (windows of the books for PPL, examples for a
task, repeats for speed): PPL = exp(sum NLL / sum tokens), retained = sum(weight * gain) / sum(weight * gain_full),
a mean = sum(value) / count. So a unit is a row of additive components, a figure a function of their column sums,
and one bootstrap resample is a draw of n units with replacement, i.e. a row of counts. The percentile interval of
the figure over RESAMPLES such draws is its 95% interval (Efron & Tibshirani 1993, ch. 13).

Paired: configurations scored on the same units (the same windows, the same examples) are resampled with the same
draws, so the interval of a difference excludes the units' own spread, which both share. Identical configurations
give a difference of exactly 0 in every draw.

The draws come from a generator seeded by SEED and the number of units, so a rerun gives the same interval.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A figure over n units: its value on all of them and its 95% interval (None where a resample leaves it
    undefined, or with fewer than 2 units)."""
    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def has_interval(self) -> bool:
        return self.low is not None

    def excludes(self, value: float = 0.0) -> bool:
        """Whether the interval lies wholly on one side of value (a difference distinguishable from 0)."""
        return self.has_interval and (self.low > value or self.high < value)

    def text(self, digits: int = 3, scale: float = 1.0, signed: bool = False, unit: str = "") -> str:
        """'0.320 [0.210, 0.430]' (e.g. '+1.08% [+0.11%, +2.90%]' with scale 100, signed, unit '%'), or the value
        alone without an interval."""
        def number(x: float) -> str:
            return f"{x * scale:{'+' if signed else ''}.{digits}f}{unit}"
        return f"{number(self.mean)} [{number(self.low)}, {number(self.high)}]" if self.has_interval else \
            number(self.mean)


Figure = Callable[[np.ndarray], np.ndarray]  # column sums (..., k) -> the figure (...), NaN where undefined


@functools.lru_cache(maxsize=64)
def draws(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) counts: how often each unit is drawn in each resample (each row sums to n). The same for
    every figure over n units, so made once per n (read-only: callers share it)."""
    generator = np.random.default_rng([seed, n])
    picks = generator.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n), dtype=np.int64)
    np.add.at(counts, (np.arange(resamples)[:, None], picks), 1)
    counts.flags.writeable = False
    return counts


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    if not np.isfinite(values).all():  # a draw where the figure is undefined (a zero denominator)
        return None, None
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def estimate(units: np.ndarray, figure: Figure, counts: np.ndarray | None = None) -> Estimate | None:
    """The figure over units (n, k) with its interval; None when the figure of all units is undefined."""
    units = np.asarray(units, dtype=np.float64)
    n = len(units)
    if n == 0:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(figure(units.sum(0)))
        if not np.isfinite(value):
            return None
        if n < 2:
            return Estimate(value, None, None, n)
        counts = draws(n) if counts is None else counts
        low, high = _interval(figure(counts @ units))
    return Estimate(value, low, high, n)


def paired_difference(units_a: np.ndarray, units_b: np.ndarray, figure: Figure,
                      compare: Callable[[np.ndarray, np.ndarray], np.ndarray] = np.subtract) -> Estimate | None:
    """compare(figure(a), figure(b)), by default figure(a) - figure(b), over units scored by both (row i of a
    and of b: the same unit), each draw resampling the same units for both."""
    a, b = np.asarray(units_a, dtype=np.float64), np.asarray(units_b, dtype=np.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a paired difference needs the same units on both sides, got {len(a)} and {len(b)}")
    k = a.shape[1]
    return estimate(np.concatenate((a, b), axis=1), lambda s: compare(figure(s[..., :k]), figure(s[..., k:])))


# The figures the report uses, of column sums.
def ratio(sums: np.ndarray) -> np.ndarray:
    """sums[0] / sums[1]: retained (weighted gains), a mean (values, count)."""
    return sums[..., 0] / np.where(np.abs(sums[..., 1]) > 1e-9, sums[..., 1], np.nan)


def perplexity(sums: np.ndarray) -> np.ndarray:
    """exp(sum NLL / tokens) from (NLL, tokens)."""
    return np.exp(ratio(sums))


def mean_of(values) -> Estimate | None:
    """The mean of independent values with its interval."""
    values = np.asarray(values, dtype=np.float64)
    return estimate(np.stack((values, np.ones_like(values)), axis=1), ratio)


def oracle_share(value: float, oracle: float, worst: float) -> float | None:
    """Where value lies between the worst configuration's figure (0) and the oracle's (1) at one budget, for a
    figure where higher is better: the share of the oracle's headroom the configuration reaches. None when the
    oracle is no better than the worst."""
    headroom = oracle - worst
    return (value - worst) / headroom if headroom > 1e-9 else None
