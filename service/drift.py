"""Drift: how far the data scored now is from the calibration data the model was fitted with.

Training stores a :class:`~service.bundle.Reference` in the manifest: per feature, buckets
(deciles for numerics; false/true for booleans; the most common categories, ``<other>``,
``<unknown>`` for categoricals; ``<missing>`` for all) and the calibration share of each; the
same for the default score. The service counts every scored record into those buckets
(:class:`DriftCounter`, one vectorised pass per micro-batch) and Prometheus computes the
population stability index over a window from the counters; ``vae-anomaly drift`` computes the
same PSI offline for a file. Numpy only (the service has no pandas).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from service import metrics
from service.bundle import (
    MISSING_INDEX,
    MISSING_TOKEN,
    UNKNOWN_INDEX,
    UNKNOWN_TOKEN,
    BooleanFeature,
    BucketReference,
    CategoricalFeature,
    Manifest,
    NumericFeature,
    Reference,
    input_of,
)

log = logging.getLogger("vae_anomaly.drift")

EPS = 1e-4  # floor on both shares in PSI: an empty bucket adds a finite term, never NaN
DECILES = np.linspace(0.1, 0.9, 9)
TOP_CATEGORIES = 10  # categories with a bucket of their own; the rest share "<other>"
OTHER_TOKEN = "<other>"
AUTO_MAX_FEATURES = 64  # drift_features=auto tracks at most this many features
AnyFeature = NumericFeature | BooleanFeature | CategoricalFeature


def psi(counts: np.ndarray, expected: Sequence[float]) -> float | None:
    """Population stability index sum((o - e) * ln(o / e)) of observed bucket counts against
    expected shares, both shares floored at EPS; None when nothing was observed."""
    total = float(np.sum(counts))
    if total <= 0:
        return None
    o = np.maximum(np.asarray(counts, dtype=np.float64) / total, EPS)
    e = np.maximum(np.asarray(expected, dtype=np.float64), EPS)
    return float(np.sum((o - e) * np.log(o / e)))


class Buckets:
    """Bucket ids of encoded model inputs (``x_num``/``x_cat``) for some features, all features
    in one pass: ``np.bincount`` of the ids gives each bucket's count, in the order of
    ``labels``. Numeric and boolean values go to the number of edges below them (right-closed
    buckets), NaN to the missing bucket after them; categories through a lookup table."""

    def __init__(self, features: Sequence[AnyFeature], refs: Sequence[BucketReference]) -> None:
        by_name = {f.name: f for f in features}
        n_num = sum(1 for f in features if input_of(f) == "x_num")
        self.labels: list[tuple[str, str]] = []  # (feature, bucket) of each id
        num: list[tuple[int, int, list[float]]] = []  # (column, first id, edges)
        cat: list[tuple[int, np.ndarray]] = []  # (column, ids by category index)
        for r in refs:
            f = by_name[r.name]
            if isinstance(f, CategoricalFeature):
                cat.append((f.column, len(self.labels) + np.asarray(r.index, dtype=np.intp)))
            else:
                num.append((f.column, len(self.labels), r.edges))
            self.labels += [(r.name, b) for b in r.buckets]
        self.n = len(self.labels)
        width = max((len(e) for _, _, e in num), default=0)
        self.edges = np.full((len(num), width), np.inf)  # padding: no value is above it
        for i, (_, _, e) in enumerate(num):
            self.edges[i, : len(e)] = e
        self.num_cols = np.array([c for c, _, _ in num], dtype=np.intp)
        self.all_num = [c for c, _, _ in num] == list(range(n_num))  # no column to pick
        self.num_first = np.array([s for _, s, _ in num], dtype=np.intp)
        self.num_missing = np.array([s + len(e) + 1 for _, s, e in num], dtype=np.intp)
        self.cat_cols = np.array([c for c, _ in cat], dtype=np.intp)
        self.lut = np.concatenate([t for _, t in cat]) if cat else np.empty(0, np.intp)
        self.lut_start = np.cumsum([0, *[len(t) for _, t in cat][:-1]]).astype(np.intp)

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        parts = []
        if len(self.num_cols):
            x = inputs["x_num"] if self.all_num else inputs["x_num"][:, self.num_cols]
            below = (x[:, :, None] > self.edges).sum(axis=2)
            parts.append(np.where(np.isnan(x), self.num_missing, below + self.num_first).ravel())
        if len(self.cat_cols):
            parts.append(self.lut[inputs["x_cat"][:, self.cat_cols] + self.lut_start].ravel())
        return np.concatenate(parts) if parts else np.empty(0, np.intp)

    def counts(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return np.bincount(self(inputs), minlength=self.n)


def score_counts(ref: BucketReference, scores: np.ndarray) -> np.ndarray:
    """Counts of scores in the score reference's buckets (same right-closed rule)."""
    ids = np.searchsorted(np.asarray(ref.edges), scores, side="left")
    return np.bincount(ids, minlength=len(ref.buckets))


# ---------------------------------------------------------------- the reference (training)


def _interval_labels(edges: list[float]) -> list[str]:
    """ "<=e" for each edge and ">last" (or "any" with no edges); precise enough to be unique."""
    if not edges:
        return ["any"]
    for digits in range(4, 18):
        labels = [f"<={e:.{digits}g}" for e in edges] + [f">{edges[-1]:.{digits}g}"]
        if len(set(labels)) == len(labels):
            return labels
    raise AssertionError("distinct floats print distinctly at 17 digits")


def _edges(values: np.ndarray) -> list[float]:
    present = values[~np.isnan(values)].astype(np.float64)
    return np.unique(np.quantile(present, DECILES)).tolist() if len(present) else []


def _feature_reference(f: AnyFeature, inputs: dict[str, np.ndarray]) -> BucketReference:
    if isinstance(f, CategoricalFeature):
        codes = np.bincount(inputs["x_cat"][:, f.column], minlength=len(f.categories))
        kept = range(MISSING_INDEX + 1, len(f.categories))
        top = sorted(kept, key=lambda i: -codes[i])[:TOP_CATEGORIES]  # stable: ties by index
        names = [f.categories[i] for i in top]
        other = len(top) < len(kept)
        buckets = [*names, *([OTHER_TOKEN] if other else []), UNKNOWN_TOKEN, MISSING_TOKEN]
        index = [buckets.index(OTHER_TOKEN) if other else 0] * len(f.categories)
        for b, i in enumerate(top):
            index[i] = b
        index[UNKNOWN_INDEX], index[MISSING_INDEX] = len(buckets) - 2, len(buckets) - 1
        return BucketReference(
            name=f.name, buckets=buckets, expected=[0.0] * len(buckets), index=index
        )
    x = inputs["x_num"][:, f.column]
    if isinstance(f, BooleanFeature):
        buckets = ["false", "true", MISSING_TOKEN]
        return BucketReference(name=f.name, buckets=buckets, expected=[0.0] * 3, edges=[0.0])
    edges = _edges(x)
    present = np.sort(x[~np.isnan(x)].astype(np.float64))
    grid = np.unique(np.quantile(present, np.linspace(0, 1, 101))) if len(present) else present
    cdf = np.searchsorted(present, grid, side="right") / max(len(present), 1)
    buckets = [*_interval_labels(edges), MISSING_TOKEN]
    return BucketReference(
        name=f.name,
        buckets=buckets,
        expected=[0.0] * len(buckets),
        edges=edges,
        ks_values=list(map(float, grid)),
        ks_cdf=cdf.tolist(),
    )


def build_reference(
    features: Sequence[AnyFeature], inputs: dict[str, np.ndarray], scores: np.ndarray
) -> Reference:
    """The drift reference of the calibration records (their encoded inputs and default
    scores); expected shares are counted with the very buckets the service uses."""
    refs = [_feature_reference(f, inputs) for f in features]
    counts = Buckets(features, refs).counts(inputs)
    n = len(scores)
    filled, start = [], 0
    for r in refs:
        share = counts[start : start + len(r.buckets)] / n
        filled.append(r.model_copy(update={"expected": share.tolist()}))
        start += len(r.buckets)
    edges = _edges(np.asarray(scores, dtype=np.float64))
    labels = _interval_labels(edges)
    score = BucketReference(name="score", buckets=labels, expected=[0.0] * len(labels), edges=edges)
    shares = score_counts(score, scores) / n
    score = score.model_copy(update={"expected": shares.tolist()})
    return Reference(rows=n, features=filled, score=score)


# ---------------------------------------------------------------- live counting (service)


def tracked(manifest: Manifest, setting: str) -> list[BucketReference]:
    """The features whose buckets are counted: ``auto`` (all, or the first AUTO_MAX_FEATURES
    of a wider model), ``none``, or a comma-separated list of names (unknown names are
    logged and skipped: a reloaded model may have other features)."""
    refs = manifest.reference.features if manifest.reference else []
    if setting.strip() == "auto":
        if len(refs) > AUTO_MAX_FEATURES:
            log.warning(
                "drift: the model has %d features; tracking the first %d "
                "(VAE_ANOMALY_DRIFT_FEATURES names others)",
                len(refs),
                AUTO_MAX_FEATURES,
            )
        return refs[:AUTO_MAX_FEATURES]
    if setting.strip() == "none":
        return []
    names = [n.strip() for n in setting.split(",") if n.strip()]
    by_name = {r.name: r for r in refs}
    if unknown := [n for n in names if n not in by_name]:
        log.warning("drift: not tracking %s: not features of this model", unknown)
    return [by_name[n] for n in dict.fromkeys(names) if n in by_name]


class DriftCounter:
    """The drift counters of one served model: bucket counts of its tracked features and of its
    default score, and missing values of every feature, labelled with the model's name and
    version (so a reload starts new series: buckets differ between versions)."""

    def __init__(self, manifest: Manifest, features: str = "auto") -> None:
        self.manifest = manifest
        self.refs = tracked(manifest, features)
        self.buckets = Buckets(manifest.features, self.refs)
        self.score = manifest.reference.score if manifest.reference else None
        by_input = sorted(manifest.features, key=lambda f: (input_of(f) == "x_cat", f.column))
        self.missing_names = [f.name for f in by_input]
        self.children: list[Any] = []  # one counter child per id, then score, then missing

    def _series(self) -> list[tuple[Any, Any, tuple[str, ...], float]]:
        """(counter, its expected-share gauge or None, labels, expected share) of every
        series, in id order."""
        m = self.manifest
        base = (m.name, m.version)
        expected = [e for r in self.refs for e in r.expected]
        out: list[tuple[Any, Any, tuple[str, ...], float]] = [
            (metrics.FEATURE_VALUES, metrics.FEATURE_EXPECTED, (*base, f, b), e)
            for (f, b), e in zip(self.buckets.labels, expected, strict=True)
        ]
        if self.score is not None:
            out += [
                (metrics.SCORE_VALUES, metrics.SCORE_EXPECTED, (*base, b), e)
                for b, e in zip(self.score.buckets, self.score.expected, strict=True)
            ]
        return out + [(metrics.FEATURE_MISSING, None, (*base, n), 0.0) for n in self.missing_names]

    def publish(self) -> None:
        """Create every series at 0 and export the expected shares (before the model serves:
        a counter's first increment is only seen by Prometheus if the series existed)."""
        self.children = []
        for counter, gauge, labels, share in self._series():
            self.children.append(counter.labels(*labels))
            if gauge is not None:
                gauge.labels(*labels).set(share)

    def retire(self) -> None:
        """Drop this model's series from the exposition (a new version serves). With several
        workers (multiprocess mode) prometheus-client cannot remove series: the old version's
        stay exposed, constant, until the workers restart."""
        self.children = []
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return
        for counter, gauge, labels, _ in self._series():
            counter.remove(*labels)
            if gauge is not None:
                gauge.remove(*labels)

    def observe(self, inputs: dict[str, np.ndarray], scores: np.ndarray) -> None:
        """Count one scored micro-batch (its encoded inputs and default scores)."""
        children = self.children
        if not children:
            return
        parts = [np.bincount(self.buckets(inputs), minlength=self.buckets.n)]
        if self.score is not None:
            parts.append(score_counts(self.score, scores))
        if "x_num" in inputs:
            parts.append(np.isnan(inputs["x_num"]).sum(axis=0))
        if "x_cat" in inputs:
            parts.append((inputs["x_cat"] == MISSING_INDEX).sum(axis=0))
        counts = np.concatenate(parts)
        for i in np.flatnonzero(counts).tolist():
            children[i].inc(int(counts[i]))
