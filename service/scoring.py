"""Scoring: columns of validated values in, scores and verdicts out. Knows nothing of HTTP nor
of Prometheus: the service counts each :class:`Batch` (``metrics.scored``), the model's drift
counters (service/drift.py, per-model state held here) included.

Both protocol adapters (``/v1`` and ``/v2``) turn their requests into columns and call
:meth:`Scorer.score`, or :meth:`Scorer.score_many` through the micro-batcher.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt

from service import latent
from service.bundle import Bundle, BundleError, Manifest
from service.drift import DriftCounter
from service.features import Encoder, Percentiles
from service.records import RecordPlan
from service.runtime import check_runs, open_bundle, warm_up_columns
from service.values import never_normal


@dataclass
class Scored:
    """Results for a batch of records, all arrays of the batch's length."""

    score_type: str
    score: npt.NDArray[np.float64]
    is_anomaly: npt.NDArray[np.bool_]
    threshold: float
    percentile: npt.NDArray[np.float64]
    order: npt.NDArray[np.intp]  # [n, n_features]: feature indexes, largest share first
    shares: npt.NDArray[np.float32]  # [n, n_features]: each feature's share, in that order
    unknown: dict[str, npt.NDArray[np.bool_]]  # feature -> rows with an unseen category
    # (feature, kind, rows) of values the model never saw (service/values.py)
    unusual: list[tuple[str, str, npt.NDArray[np.bool_]]] = field(default_factory=list)
    # what the model expected of each feature (service/latent.py): the batch's, and where
    # this request's rows start in it; None for a bundle without latent files
    expected: tuple[latent.Expected, int] | None = None


@dataclass
class Batch:
    """One onnxruntime call: each request's results, and what the service counts of it."""

    results: list[Scored]
    rows: int
    seconds: float  # onnxruntime's time
    anomalies: int
    default_scores: npt.NDArray[np.float64]  # every row's score of the model's default type
    unknown: dict[str, npt.NDArray[np.bool_]]  # feature -> rows with an unseen category
    unusual: list[tuple[str, str, npt.NDArray[np.bool_]]]  # (feature, kind, rows)
    inputs: dict[str, np.ndarray]  # the model's inputs (the drift counters bucket them)
    model_scores: np.ndarray  # the graph's default-type scores, as it returned them


class Scorer:
    """One bundle and its onnxruntime session (one per worker process), and what is derived
    from the bundle once: the input encoder, the percentile table, the record validation plan,
    the drift counters."""

    def __init__(
        self,
        bundle: str | os.PathLike[str] | Bundle,
        *,
        threads: int = 1,
        drift_features: str = "auto",
    ) -> None:
        self.bundle, self.model = open_bundle(bundle, intra_op_threads=threads)
        self.manifest: Manifest = self.bundle.manifest
        self.feature_names = [f.name for f in self.manifest.features]
        self.records = RecordPlan(self.manifest)
        self.encode = Encoder(self.manifest.features)
        self.percentile = Percentiles(self.manifest)
        # counts (the model's own drift series) once the service publishes it
        self.drift = DriftCounter(self.manifest, drift_features)
        self.latent = latent.load(self.bundle, threads)  # None: a bundle without one
        self.ready = False

    @property
    def version(self) -> str:
        return self.manifest.version

    def score(
        self, columns: Mapping[str, Sequence[Any] | np.ndarray], score_type: str | None
    ) -> Scored:
        """Score records given as feature name -> values (None = missing)."""
        return self.score_many([(columns, score_type)]).results[0]

    def score_many(
        self, requests: Sequence[tuple[Mapping[str, Sequence[Any] | np.ndarray], str | None]]
    ) -> Batch:
        """Score several requests' records in one onnxruntime call (micro-batching)."""
        m = self.manifest
        if len(requests) == 1:
            columns: Mapping[str, Sequence[Any] | np.ndarray] = requests[0][0]
        else:
            categorical = self.encode.index
            columns = {
                k: _joined([cols[k] for cols, _ in requests], k in categorical)
                for k in self.feature_names
            }
        enc = self.encode(columns)
        start = time.perf_counter()
        out = self.model.run(enc.inputs)
        elapsed = time.perf_counter() - start
        # whole-batch array work once (numpy calls cost more than the rows in them), then slices
        attribution = out["attribution"]
        order = np.argsort(-attribution, axis=1, kind="stable")
        shares = np.take_along_axis(attribution, order, axis=1)
        found = enc.unusual
        by_type = {}
        for st in {score_type or m.default_score for _, score_type in requests}:
            scores = out[st].astype(np.float64)
            thr = m.thresholds[st].value  # type: ignore[index]
            never_normal(scores, found, thr)
            by_type[st] = (scores, scores > thr, thr, self.percentile(st, scores))
        unknown = {k: v for k, v in enc.unknown.items() if v.any()}
        expected = None if self.latent is None else latent.Expected(self.latent, enc.inputs)
        unusual = [] if found is None else found.items
        results = []
        lo = 0
        for cols, score_type in requests:
            hi = lo + len(cols[m.features[0].name])
            st = score_type or m.default_score
            results.append(
                _rows(st, by_type[st], order, shares, unknown, unusual, lo, hi, expected)
            )
            lo = hi
        default = by_type.get(m.default_score)
        if len(by_type) == 1:
            anomalies = int(next(iter(by_type.values()))[1].sum())
        else:
            anomalies = int(sum(r.is_anomaly.sum() for r in results))
        return Batch(
            results=results,
            rows=enc.n_rows,
            seconds=elapsed,
            anomalies=anomalies,
            default_scores=default[0] if default else out[m.default_score].astype(np.float64),
            unknown=unknown,
            unusual=unusual,
            inputs=enc.inputs,
            model_scores=out[m.default_score],
        )

    def warm_up(self, timeout: float | None = None) -> None:
        """Check the model runs as the contract says (:func:`check_runs`), then score the
        warm-up records as a request would. Any failure is a BundleError: the model is refused."""
        check_runs(self.bundle, self.model, timeout=timeout)
        try:
            self.score(warm_up_columns(self.manifest), None)
            if self.latent is not None:
                self.latent.check(self.encode(warm_up_columns(self.manifest)).inputs)
        except Exception as e:  # onnxruntime's own classes (Fail, ...) are not RuntimeErrors
            path = self.bundle.model_path
            raise BundleError(f"{path}: warm-up failed: {type(e).__name__}: {e}") from e
        self.ready = True


def _joined(parts: list[Sequence[Any] | np.ndarray], categorical: bool) -> Sequence[Any]:
    """One feature's values over a batch's requests. Lists (JSON) are chained; when a request
    gave an array (binary tensors: numbers, booleans), the numbers are joined as one float
    array (a list's None is NaN there: missing, as the encoder reads it)."""
    if all(type(p) is list for p in parts):
        return list(chain.from_iterable(parts))
    if categorical:
        return list(chain.from_iterable(p.tolist() if type(p) is np.ndarray else p for p in parts))
    arrays = [p if type(p) is np.ndarray else np.asarray(p, dtype=np.float64) for p in parts]
    return np.concatenate(arrays)  # type: ignore[return-value]


def _rows(
    st: str,
    typed: tuple[Any, Any, float, Any],
    order: npt.NDArray[np.intp],
    shares: npt.NDArray[np.float32],
    unknown: dict[str, npt.NDArray[np.bool_]],
    unusual: list[tuple[str, str, npt.NDArray[np.bool_]]],
    lo: int,
    hi: int,
    expected: latent.Expected | None,
) -> Scored:
    """Rows ``lo:hi`` of a batch: one request's results (``typed``: the batch's scores,
    verdicts, threshold and percentiles of score type ``st``; ``expected``: what the model
    expected of the batch's records, None without latent files)."""
    scores, is_anomaly, thr, percentile = typed
    return Scored(
        score_type=st,
        score=scores[lo:hi],
        is_anomaly=is_anomaly[lo:hi],
        threshold=thr,
        percentile=percentile[lo:hi],
        order=order[lo:hi],
        shares=shares[lo:hi],
        unknown={k: v[lo:hi] for k, v in unknown.items() if v[lo:hi].any()},
        unusual=[(f, k, r[lo:hi]) for f, k, r in unusual if r[lo:hi].any()],
        expected=None if expected is None else (expected, lo),
    )


def top_features(names: list[str], scored: Scored, k: int) -> list[list[dict[str, Any]]]:
    """The ``k`` features with the largest share of each record's score (shares that round to
    zero left out)."""
    n = len(scored.score)
    if k <= 0:
        return [[] for _ in range(n)]
    return [
        [
            {"name": names[c], "share": r}
            for c, v in zip(cols, vals, strict=False)
            if (r := round(v, 4)) > 0  # a share that rounds to 0 names nothing
        ]
        for cols, vals in zip(
            scored.order[:, :k].tolist(), scored.shares[:, :k].tolist(), strict=True
        )
    ]
