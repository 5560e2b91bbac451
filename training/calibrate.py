"""Thresholds, score distributions and detection metrics, from scores alone (numpy only)."""

from __future__ import annotations

import math

import numpy as np

TAIL_MIN_EXCEEDANCES = 20  # below this many expected false alarms, fit the tail instead
MIN_SCORES = 10  # the tail fit needs at least this many scores


def threshold_for_fpr(scores: np.ndarray, fpr: float) -> tuple[float, str]:
    """Threshold whose false-positive rate on new normal records is ``fpr``.

    With enough calibration scores (``n * fpr >= 20``) this is the conformal order statistic
    (the ``ceil((n + 1)(1 - fpr))``-th smallest). With fewer, a single order statistic is too
    noisy (for 30 scores the 99th percentile is just the maximum), so an exponential tail is
    fitted to the largest 10% (at least 10) of the scores (peaks over threshold) and extrapolated.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n < MIN_SCORES:
        raise ValueError(f"{n} calibration scores; at least {MIN_SCORES} are needed")
    if n * fpr >= TAIL_MIN_EXCEEDANCES:
        k = math.ceil((n + 1) * (1 - fpr))
        return float(s[min(k, n) - 1]), "conformal order statistic"
    m = max(10, math.ceil(0.1 * n))
    u = s[n - m - 1]
    excess = s[n - m :] - u
    sigma = float(excess.mean())
    return float(u + sigma * math.log((m / n) / fpr)), f"exponential tail fit on the top {m}"


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
