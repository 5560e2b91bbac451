"""Every Prometheus metric of the service, in one place.

With several workers, set ``PROMETHEUS_MULTIPROC_DIR`` before this module is imported (the
``serve`` command does): each worker then writes its samples there and ``/metrics`` adds them up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from service.bundle import Manifest

if TYPE_CHECKING:
    from service.scoring import Scored, Scorer

PREFIX = "vae_anomaly"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 10_000)

HTTP_REQUESTS = Counter(
    f"{PREFIX}_http_requests_total", "HTTP requests", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    f"{PREFIX}_http_request_duration_seconds",
    "HTTP request duration",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
RECORDS_SCORED = Counter(f"{PREFIX}_records_scored_total", "Records scored")
ANOMALIES = Counter(f"{PREFIX}_anomalies_total", "Records scored above the threshold")
INFERENCE_SECONDS = Histogram(
    f"{PREFIX}_inference_seconds", "onnxruntime time per call", buckets=LATENCY_BUCKETS
)
BATCH_SIZE = Histogram(f"{PREFIX}_batch_size", "Records per inference call", buckets=BATCH_BUCKETS)
INVALID_RECORDS = Counter(
    f"{PREFIX}_invalid_records_total", "Records rejected, by reason", ["reason"]
)
UNKNOWN_CATEGORY = Counter(
    f"{PREFIX}_unknown_category_total", "Category values never seen in training", ["feature"]
)
UNUSUAL_VALUES = Counter(
    f"{PREFIX}_unusual_values_total",
    "Values the model never saw in training (scored and named), by feature and kind",
    ["feature", "kind"],
)
MODEL_INFO = Gauge(
    f"{PREFIX}_model_info",
    "The model being served (1)",
    ["name", "version", "score_type"],
    multiprocess_mode="max",
)
THRESHOLD = Gauge(
    f"{PREFIX}_threshold",
    "Alarm threshold of the default score type",
    multiprocess_mode="livemostrecent",
)
TARGET_FPR = Gauge(
    f"{PREFIX}_target_fpr",
    "False-positive rate the threshold was calibrated for",
    multiprocess_mode="livemostrecent",
)
READY = Gauge(
    f"{PREFIX}_ready", "1 when a model is loaded and warmed up", multiprocess_mode="livemax"
)
MODEL_RELOADS = Counter(f"{PREFIX}_model_reloads_total", "Model (re)loads", ["result"])
MODEL_LOADS_STUCK = Gauge(
    f"{PREFIX}_model_loads_stuck",
    "Model loads given up at the reload timeout that are still running",
    multiprocess_mode="livesum",
)
SINK_WRITTEN = Counter(f"{PREFIX}_sink_records_total", "Scored records written to the sink")
SINK_DROPPED = Counter(
    f"{PREFIX}_sink_dropped_records_total", "Scored records dropped: the sink writer was behind"
)
# drift (service/drift.py): every series carries the model's name and version
FEATURE_VALUES = Counter(
    f"{PREFIX}_feature_values_total",
    "Scored records by feature and bucket of the model's drift reference",
    ["model", "version", "feature", "bucket"],
)
FEATURE_EXPECTED = Gauge(
    f"{PREFIX}_feature_expected_share",
    "Share of the calibration records in each bucket",
    ["model", "version", "feature", "bucket"],
    multiprocess_mode="livemax",
)
FEATURE_MISSING = Counter(
    f"{PREFIX}_feature_missing_total", "Missing values scored", ["model", "version", "feature"]
)
SCORE_VALUES = Counter(
    f"{PREFIX}_score_values_total",
    "Scored records by bucket (calibration deciles) of the default score",
    ["model", "version", "bucket"],
)
SCORE_EXPECTED = Gauge(
    f"{PREFIX}_score_expected_share",
    "Share of the calibration records in each score bucket",
    ["model", "version", "bucket"],
    multiprocess_mode="livemax",
)

_score: Histogram | None = None


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def request_done(method: str, route: str, status: int, seconds: float) -> None:
    """Count one HTTP request (label children cached: this runs for every request)."""
    key = (method if method in METHODS else "other", route, status)
    children = _request_children.get(key)
    if children is None:
        children = (HTTP_REQUESTS.labels(key[0], route, str(status)), HTTP_DURATION.labels(route))
        _request_children[key] = children
    children[0].inc()
    children[1].observe(seconds)


def score_buckets(m: Manifest) -> list[float]:
    """Buckets placed around the threshold: normal-score quantiles below it, multiples above."""
    st = m.default_score
    thr = m.thresholds[st].value
    d = m.distributions[st]
    qs = np.interp([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98], d.probs, d.quantiles)
    spread = max(thr - float(qs[0]), 1e-6)
    above = [thr + spread * k for k in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)]
    return sorted({round(float(b), 6) for b in [*qs, thr, *above]})


def score_histogram(m: Manifest) -> Histogram:
    """The score histogram; its buckets come from the first model served by this process
    (Prometheus buckets cannot change while the process lives)."""
    global _score
    if _score is None:
        _score = Histogram(
            f"{PREFIX}_score", f"Anomaly scores ({m.default_score})", buckets=score_buckets(m)
        )
    return _score


def describe_model(new: Manifest, old: Manifest | None) -> None:
    """model_info and threshold for the model now serving (and the score histogram exists
    from the first one on, exported at zero before any record is scored)."""
    score_histogram(new)
    if old is not None:
        MODEL_INFO.labels(old.name, old.version, old.default_score).set(0)
    MODEL_INFO.labels(new.name, new.version, new.default_score).set(1)
    THRESHOLD.set(new.thresholds[new.default_score].value)
    TARGET_FPR.set(new.target_fpr)
    READY.set(1)


def scored(
    scorer: Scorer, requests: Sequence[tuple[Mapping[str, Any], str | None]]
) -> list[Scored]:
    """The service's scoring: ``requests`` in one onnxruntime call (:meth:`Scorer.score_many`),
    counted here."""
    batch = scorer.score_many(requests)
    INFERENCE_SECONDS.observe(batch.seconds)
    BATCH_SIZE.observe(batch.rows)
    RECORDS_SCORED.inc(batch.rows)
    ANOMALIES.inc(batch.anomalies)
    observe = score_histogram(scorer.manifest).observe
    for v in batch.default_scores.tolist():  # public API, one call each: ~1 us a value
        observe(v)
    for name, rows in batch.unknown.items():
        UNKNOWN_CATEGORY.labels(name).inc(int(rows.sum()))
    for name, kind, rows in batch.unusual:
        UNUSUAL_VALUES.labels(name, kind).inc(int(rows.sum()))
    scorer.drift.observe(batch.inputs, batch.model_scores)  # counts once the service publishes
    return batch.results


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric (summed over workers in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
