"""Thresholds and metrics against known distributions and scikit-learn."""

from __future__ import annotations

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
    assert "tail" in calibrate.threshold_for_fpr(rng.normal(size=500), 0.01)[1]
    assert "order statistic" in calibrate.threshold_for_fpr(rng.normal(size=5000), 0.01)[1]
    with pytest.raises(ValueError):
        calibrate.threshold_for_fpr(np.arange(5.0), 0.01)


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
