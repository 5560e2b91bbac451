"""Thresholds, score distributions and detection metrics, from scores alone (numpy only)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_SCORES = 10  # the tail fit needs at least this many scores
INTERVAL_LEVEL = 0.9  # the stated interval of the alarm rate is a 90% one
INTERVAL_DRAWS = 400  # x10 Monte Carlo draws for a tail fit's interval: stable to ~1%


@dataclass(frozen=True)
class Tail:
    """Peaks over threshold: P(score > u + x) = rate * exp(-x / sigma), fitted to the ``m``
    largest of ``n`` scores (``rate = m / n``)."""

    u: float
    sigma: float
    rate: float
    m: int

    def quantile(self, fpr: float) -> float:
        # u + sigma * log(r) is the quantile for the true sigma; with sigma estimated from m
        # exceedances (Gamma(m) distributed) its expected rate is (1 + log(r) / m) ** -m,
        # over the target (1.4x for m = 10). This form makes the expected rate the target.
        r = self.rate / fpr
        return self.u + self.sigma * self.m * (r ** (1.0 / self.m) - 1.0)


def fit_tail(scores: np.ndarray) -> Tail:
    """An exponential tail fitted to the largest 10% (at least 10) of the scores."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    m = max(MIN_SCORES, math.ceil(0.1 * n))
    u = float(s[n - m - 1])
    return Tail(u, float((s[n - m :] - u).mean()), m / n, m)


def _position(n: int, fpr: float) -> float:
    """1-based position among n sorted scores of the (1 - fpr) quantile of new scores: the
    k-th smallest of n exchangeable scores exceeds a new one with probability k / (n + 1)."""
    return (n + 1) * (1.0 - fpr)


def needs_tail(n: int, fpr: float) -> bool:
    """Whether ``n`` calibration scores are too few to hold the (1 - fpr) quantile."""
    return _position(n, fpr) > n


def threshold_for_fpr(scores: np.ndarray, fpr: float) -> tuple[float, str]:
    """Threshold whose false-positive rate on new normal records is ``fpr``.

    When that quantile lies within the calibration scores (``n >= 1 / fpr - 1``), it is read
    between two order statistics: unbiased whatever the shape of the scores' tail (a score
    that sums hundreds of near-constant columns has a tail no fitted model extrapolates
    well). Below that, a tail is fitted to the largest scores (peaks over threshold,
    :func:`fit_tail`) and extrapolated; :func:`fpr_interval` says how precise either is.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n < MIN_SCORES:
        raise ValueError(f"{n} calibration scores; at least {MIN_SCORES} are needed")
    h = _position(n, fpr)
    if not needs_tail(n, fpr):
        k = int(h)
        upper = s[k] if k < n else s[n - 1]
        return float(s[k - 1] + (h - k) * (upper - s[k - 1])), "order statistic"
    tail = fit_tail(s)
    return tail.quantile(fpr), f"exponential tail fit on the top {tail.m}"


def fpr_interval(scores: np.ndarray, fpr: float, seed: int = 0) -> tuple[float, float]:
    """A 90% interval of the false-positive rate that the threshold from these scores has on
    new normal records: how precisely so few (or so many) calibration scores pin it down.

    For an order statistic this is exact (the k-th smallest of n leaves a rate distributed
    Beta(n + 1 - k, k)). For the fitted tail it is exact if the tail is exponential: the rate
    above u (the (n - m)-th smallest) is Beta(m + 1, n - m), the scale estimated from m
    exceedances is Gamma(m) / m times the true one, and the two are independent."""
    n = len(scores)
    rng = np.random.default_rng(seed)
    draws = INTERVAL_DRAWS * 10
    h = _position(n, fpr)
    if not needs_tail(n, fpr):
        rates = rng.beta(n + 1 - h, h, draws)
    else:
        m = fit_tail(scores).m
        c = m * ((m / n / fpr) ** (1.0 / m) - 1.0)  # the threshold is u + sigma * c
        rates = rng.beta(m + 1, n - m, draws) * np.exp(-c * rng.gamma(m, 1.0 / m, draws))
    lo, hi = np.quantile(rates, [(1 - INTERVAL_LEVEL) / 2, (1 + INTERVAL_LEVEL) / 2])
    return float(lo), float(hi)


def distribution(scores: np.ndarray, max_points: int = 2001) -> tuple[list[float], list[float]]:
    """Empirical CDF of the scores as (probs, quantiles), at most ``max_points`` points."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n <= max_points:
        probs = np.arange(1, n + 1) / n
        return probs.tolist(), s.tolist()
    # denser in the upper tail, where alarms are decided
    body = np.linspace(0.0, 0.99, max_points // 2, endpoint=False)
    tail = np.linspace(0.99, 1.0, max_points - len(body))
    probs = np.concatenate([body, tail])
    return probs.tolist(), np.quantile(s, probs).tolist()


def _rankdata(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    _, inv, counts = np.unique(x[order], return_inverse=True, return_counts=True)
    avg = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = avg[inv]
    return ranks


def roc_auc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Probability that an anomaly scores above a normal record (ties count half)."""
    n0, n1 = len(normal), len(anomalous)
    ranks = _rankdata(np.concatenate([normal, anomalous]).astype(np.float64))
    return float((ranks[n0:].sum() - n1 * (n1 + 1) / 2.0) / (n0 * n1))


def _counts(normal: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives when flagging ``score >= t``, for each distinct t (descending)."""
    scores = np.concatenate([normal, anomalous]).astype(np.float64)
    y = np.concatenate([np.zeros(len(normal)), np.ones(len(anomalous))])
    order = np.argsort(-scores, kind="mergesort")
    scores, y = scores[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]
    tps = np.cumsum(y)[last]
    return tps, (last + 1) - tps, scores[last]


def average_precision(normal: np.ndarray, anomalous: np.ndarray) -> float:
    tps, fps, _ = _counts(normal, anomalous)
    recall = tps / len(anomalous)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * tps / (tps + fps)))


def f1_threshold(normal: np.ndarray, anomalous: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximizing F1 when flagging ``score > threshold``."""
    tps, fps, cuts = _counts(normal, anomalous)
    f1 = 2 * tps / (2 * tps + fps + (len(anomalous) - tps))
    i = int(np.argmax(f1))
    lower = cuts[i + 1] if i + 1 < len(cuts) else cuts[i] - 1.0
    return float((cuts[i] + lower) / 2.0), float(f1[i])


def roc_curve(normal: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at each distinct threshold."""
    tps, fps, _ = _counts(normal, anomalous)
    return np.r_[0.0, fps / len(normal)], np.r_[0.0, tps / len(anomalous)]
