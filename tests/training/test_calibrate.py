"""Thresholds and metrics against known distributions and scikit-learn."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from training import calibrate


@pytest.mark.parametrize("n", [60, 200, 1000, 20_000])
def test_threshold_hits_the_target_rate_on_average(n: int) -> None:
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(200):
        # scores with a gamma-like tail, as negative ELBOs have
        cal = rng.gamma(4.0, 1.0, n)
        thr, _ = calibrate.threshold_for_fpr(cal, 0.01)
        rates.append(float(np.mean(rng.gamma(4.0, 1.0, 20_000) > thr)))
    mean = float(np.mean(rates))
    assert 0.006 <= mean <= 0.015, f"n={n}: mean observed rate {mean:.4f}"


def test_threshold_method_depends_on_sample_size() -> None:
    rng = np.random.default_rng(1)
    # the 99th percentile of new scores lies within 99 or more calibration scores, beyond 98
    assert "tail" in calibrate.threshold_for_fpr(rng.normal(size=98), 0.01)[1]
    assert "order statistic" in calibrate.threshold_for_fpr(rng.normal(size=99), 0.01)[1]
    assert "order statistic" in calibrate.threshold_for_fpr(rng.normal(size=500), 0.01)[1]
    with pytest.raises(ValueError):
        calibrate.threshold_for_fpr(np.arange(5.0), 0.01)


def _mean_rate(draw: Callable[[int], np.ndarray], n: int, reps: int, ref: np.ndarray) -> float:
    """Mean false-positive rate, on ``ref`` (a large sorted sample), of thresholds calibrated
    on ``reps`` fresh sets of ``n`` scores."""
    rates = [
        1.0 - np.searchsorted(ref, calibrate.threshold_for_fpr(draw(n), 0.01)[0]) / len(ref)
        for _ in range(reps)
    ]
    return float(np.mean(rates))


def test_heavy_tailed_scores_get_the_target_rate() -> None:
    # a score summing hundreds of near-constant columns: mostly ordinary, now and then huge
    # (an exponential tail fitted to the top 20 of 200 such scores gives ~1.3% for 1%)
    rng = np.random.default_rng(2)

    def draw(n: int) -> np.ndarray:
        huge = rng.random(n) < 0.05
        return np.where(huge, rng.lognormal(5.0, 2.0, n), rng.gamma(4.0, 1.0, n))

    ref = np.sort(draw(1_000_000))
    assert 0.008 <= _mean_rate(draw, 200, 400, ref) <= 0.012


def test_small_sets_do_not_raise_too_many_alarms() -> None:
    # 40 scores with an exponential tail: extrapolating with the estimated scale as if it were
    # the true one gives ~1.4% on average for a 1% target
    rng = np.random.default_rng(3)

    def draw(n: int) -> np.ndarray:
        return rng.exponential(1.0, n)

    ref = np.sort(draw(1_000_000))
    assert 0.008 <= _mean_rate(draw, 40, 1000, ref) <= 0.012


@pytest.mark.parametrize("n", [40, 300])
def test_fpr_interval_covers_the_realized_rate(n: int) -> None:
    rng = np.random.default_rng(4)
    ref = np.sort(rng.gamma(4.0, 1.0, 1_000_000))
    hits = []
    for _ in range(100):
        cal = rng.gamma(4.0, 1.0, n)
        rate = 1.0 - np.searchsorted(ref, calibrate.threshold_for_fpr(cal, 0.01)[0]) / len(ref)
        lo, hi = calibrate.fpr_interval(cal, 0.01)
        hits.append(lo <= rate <= hi)
    assert np.mean(hits) >= 0.75


def test_fpr_interval_narrows_with_more_scores() -> None:
    rng = np.random.default_rng(5)
    widths = [
        np.subtract(*calibrate.fpr_interval(rng.normal(size=n), 0.01))[()] for n in (60, 600, 6000)
    ]
    assert -widths[0] > -widths[1] > -widths[2] > 0
    lo, hi = calibrate.fpr_interval(rng.normal(size=60), 0.01)
    assert lo < 0.01 < hi and hi > 0.02  # 60 scores cannot pin a 1% rate down to 2x


def test_metrics_agree_with_scikit_learn() -> None:
    rng = np.random.default_rng(2)
    normal = np.round(rng.normal(0, 1, 500), 1)  # rounded: ties on purpose
    bad = np.round(rng.normal(1.5, 1, 50), 1)
    y = np.r_[np.zeros(500), np.ones(50)]
    s = np.r_[normal, bad]
    assert calibrate.roc_auc(normal, bad) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert calibrate.average_precision(normal, bad) == pytest.approx(
        average_precision_score(y, s), abs=1e-12
    )
    thr, f1 = calibrate.f1_threshold(normal, bad)
    pred = s > thr
    tp = float((pred & (y == 1)).sum())
    assert f1 == pytest.approx(2 * tp / (pred.sum() + 50))


def test_distribution_is_compact_and_sorted() -> None:
    rng = np.random.default_rng(3)
    probs, q = calibrate.distribution(rng.normal(size=100_000))
    assert len(q) == 2001 and np.all(np.diff(q) >= 0) and np.all(np.diff(probs) > 0)
    probs, q = calibrate.distribution(np.arange(10.0))
    assert q == list(np.arange(10.0)) and probs[-1] == 1.0
