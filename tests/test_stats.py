"""The intervals of eval.stats against cases whose answer is known."""

import numpy as np
import pytest

from eval import stats


def test_constant_values_have_a_zero_width_interval():
    e = stats.mean_of([0.7] * 25)
    assert e.n == 25 and e.mean == pytest.approx(0.7)
    assert e.high - e.low == pytest.approx(0, abs=1e-12)


def test_identical_configurations_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    units = np.stack((rng.normal(size=40), rng.uniform(1, 2, size=40)), axis=1)
    d = stats.paired_difference(units, units.copy(), stats.ratio)
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0)
    assert not d.excludes(0)


def test_coverage_of_a_normal_mean_is_near_95_percent():
    rng = np.random.default_rng(7)
    hits, trials = 0, 400
    for _ in range(trials):
        e = stats.mean_of(rng.normal(3.0, 2.0, size=50))
        hits += e.low <= 3.0 <= e.high
    # The percentile bootstrap undercovers slightly at n = 50 (about 94%); 400 trials put +-2.2% around it.
    assert 0.89 <= hits / trials <= 0.98


def test_a_rerun_gives_the_same_interval():
    values = np.random.default_rng(3).exponential(size=30)
    assert stats.mean_of(values) == stats.mean_of(values.copy())


def test_paired_interval_is_narrower_than_the_unpaired_spread():
    # b = a + 0.1 + small noise: unit-to-unit spread is large, the difference is not.
    rng = np.random.default_rng(5)
    a = rng.normal(0, 5, size=60)
    b = a + 0.1 + rng.normal(0, 0.01, size=60)
    ones = np.ones(60)
    d = stats.paired_difference(np.stack((b, ones), 1), np.stack((a, ones), 1), stats.ratio)
    assert d.mean == pytest.approx(np.mean(b - a))
    assert d.excludes(0) and d.high - d.low < 0.02
    spread = stats.mean_of(a)
    assert spread.high - spread.low > 1.0


def test_ratio_of_sums_is_the_weighted_figure_on_all_units():
    gain, full = np.array([1.0, 2.0, 0.5]), np.array([2.0, 2.0, 1.0])
    e = stats.estimate(np.stack((gain, full), 1), stats.ratio)
    assert e.mean == pytest.approx(3.5 / 5.0)
    nll, tokens = np.array([10.0, 30.0]), np.array([5.0, 10.0])
    assert stats.estimate(np.stack((nll, tokens), 1), stats.perplexity).mean == pytest.approx(np.exp(40 / 15))


def test_undefined_figures_give_no_value_or_no_interval():
    assert stats.estimate(np.array([[1.0, 0.0], [2.0, 0.0]]), stats.ratio) is None  # no full-KV advantage at all
    one = stats.estimate(np.array([[1.0, 2.0]]), stats.ratio)
    assert one.mean == 0.5 and not one.has_interval and one.text() == "0.500"
    # Some draws pick only the unit whose denominator is 0: no interval rather than a NaN one.
    partly = stats.estimate(np.array([[1.0, 2.0], [1.0, 0.0]]), stats.ratio)
    assert partly.mean == 1.0 and not partly.has_interval
    assert stats.estimate(np.empty((0, 2)), stats.ratio) is None


def test_oracle_share():
    assert stats.oracle_share(0.5, oracle=0.9, worst=0.1) == pytest.approx(0.5)
    assert stats.oracle_share(0.9, oracle=0.9, worst=0.1) == pytest.approx(1.0)
    assert stats.oracle_share(0.3, oracle=0.3, worst=0.3) is None


def test_mismatched_units_are_refused():
    with pytest.raises(ValueError, match="same units"):
        stats.paired_difference(np.ones((3, 2)), np.ones((4, 2)), stats.ratio)
