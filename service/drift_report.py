"""``vae-anomaly drift MODEL DATA``: how far a file's records are from a model's reference.

Per feature, the population stability index over the reference's buckets (the same buckets,
floor and formula as the live Prometheus rules, so the same records give the same PSI) and a
Kolmogorov-Smirnov statistic (numeric features: against the calibration CDF on a grid of 101
percentiles; booleans: the difference in the share of true); the same for the default score;
and an HTML report of expected vs observed bucket shares. Needs pandas (the ``batch`` extra).
"""

from __future__ import annotations

import html
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from service import tables
from service.bulk import BatchError, read_chunks
from service.bundle import BucketReference, Bundle, Manifest
from service.drift import Buckets, psi, score_counts
from service.features import Encoder
from service.runtime import OnnxModel

DRIFTED = 0.2  # PSI above this: the distribution moved (the alert's threshold)
MODERATE = 0.1


@dataclass
class Drift:
    """One feature's (or the score's) drift: PSI, KS, and the bucket shares behind them."""

    feature: str
    kind: str
    psi: float | None
    ks: float | None
    buckets: list[str]
    expected: list[float]
    observed: list[float]  # shares (all zero with no records)


@dataclass
class DriftResult:
    model: str
    version: str
    records: int
    features: list[Drift] = field(default_factory=list)
    score: Drift | None = None

    def ranked(self) -> list[Drift]:
        """Features, largest PSI first."""
        return sorted(self.features, key=lambda d: -(d.psi or 0.0))

    def as_json(self) -> dict[str, Any]:
        def fig(d: Drift) -> dict[str, Any]:
            return {"feature": d.feature, "kind": d.kind, "psi": d.psi, "ks": d.ks}

        return {
            "model": self.model,
            "version": self.version,
            "records": self.records,
            "features": [fig(d) for d in self.ranked()],
            "score": fig(self.score) if self.score else None,
        }


def chunk_columns(manifest: Manifest, chunk: pd.DataFrame) -> dict[str, Any]:
    """Feature values of a table chunk, read as bulk scoring reads them (an unreadable value or
    an absent column is missing)."""
    columns: dict[str, Any] = {}
    for f in manifest.features:
        if f.name not in chunk.columns:
            columns[f.name] = [None] * len(chunk)
        else:
            columns[f.name] = tables.column(f.kind, chunk[f.name])[0]
    return columns


class Accumulator:
    """Bucket counts (and KS grid counts) summed over chunks of encoded records."""

    def __init__(self, manifest: Manifest) -> None:
        if manifest.reference is None:
            raise BatchError(
                f"model {manifest.name} {manifest.version} has no drift reference "
                "(trained before drift monitoring existed): retrain it"
            )
        self.manifest, self.ref = manifest, manifest.reference
        self.encode = Encoder(manifest.features)
        self.buckets = Buckets(manifest.features, self.ref.features)
        self.counts = np.zeros(self.buckets.n, dtype=np.int64)
        self.score = np.zeros(len(self.ref.score.buckets), dtype=np.int64)
        self.columns = {f.name: (f.kind, f.column) for f in manifest.features}
        self.below = {r.name: np.zeros(len(r.ks_values)) for r in self.ref.features if r.ks_values}
        self.present = dict.fromkeys(self.below, 0)
        # the calibration CDF of the score: repeated quantiles keep their last probability
        dist = manifest.distributions[manifest.default_score]
        self.score_grid, last = np.unique(np.asarray(dist.quantiles)[::-1], return_index=True)
        self.score_cdf = np.asarray(dist.probs)[::-1][last]
        self.score_below = np.zeros(len(self.score_grid))
        self.records = 0

    def add(self, columns: dict[str, Any]) -> dict[str, np.ndarray]:
        """Count a chunk's feature values; return its encoded inputs (to score them)."""
        inputs = self.encode(columns).inputs
        self.counts += self.buckets.counts(inputs)
        for r in self.ref.features:
            if r.name in self.below:
                x = inputs["x_num"][:, self.columns[r.name][1]]
                x = np.sort(x[~np.isnan(x)].astype(np.float64))
                self.below[r.name] += np.searchsorted(x, r.ks_values, side="right")
                self.present[r.name] += len(x)
        self.records += len(next(iter(columns.values())))
        return inputs

    def add_scores(self, scores: np.ndarray) -> None:
        self.score += score_counts(self.ref.score, scores)
        self.score_below += np.searchsorted(np.sort(scores), self.score_grid, side="right")

    def _ks(self, r: BucketReference, counts: np.ndarray) -> float | None:
        if r.name in self.below:
            n = self.present[r.name]
            return float(np.max(np.abs(self.below[r.name] / n - r.ks_cdf))) if n else None
        if self.columns[r.name][0] == "boolean":  # buckets false, true, missing
            o, e = counts[:2], np.asarray(r.expected[:2])
            return float(abs(o[1] / o.sum() - e[1] / e.sum())) if o.sum() and e.sum() else None
        return None  # categories have no order

    def result(self) -> DriftResult:
        m = self.manifest
        out = DriftResult(model=m.name, version=m.version, records=self.records)
        start = 0
        for r in self.ref.features:
            counts = self.counts[start : start + len(r.buckets)]
            start += len(r.buckets)
            out.features.append(
                self._drift(r, self.columns[r.name][0], counts, self._ks(r, counts))
            )
        if self.score.sum():
            ks = float(np.max(np.abs(self.score_below / self.score.sum() - self.score_cdf)))
            out.score = self._drift(self.ref.score, f"score ({m.default_score})", self.score, ks)
        return out

    @staticmethod
    def _drift(r: BucketReference, kind: str, counts: np.ndarray, ks: float | None) -> Drift:
        total = counts.sum()
        observed = (counts / total if total else counts * 0.0).tolist()
        return Drift(r.name, kind, psi(counts, r.expected), ks, r.buckets, r.expected, observed)


def drift_file(
    bundle: Bundle, data: Path, *, chunk_size: int = 100_000, threads: int = 0
) -> DriftResult:
    """The drift of every record of ``data`` (CSV, Parquet, JSON Lines) against ``bundle``."""
    acc = Accumulator(bundle.manifest)
    model = OnnxModel(bundle.model_path, intra_op_threads=threads or (os.cpu_count() or 1))
    for chunk, _ in read_chunks(data, chunk_size):  # (lines that are no record are left out)
        inputs = acc.add(chunk_columns(bundle.manifest, chunk))
        acc.add_scores(np.asarray(model.run(inputs)[bundle.manifest.default_score], np.float64))
    if acc.records == 0:
        raise BatchError(f"{data}: no records")
    return acc.result()


def drift_table(manifest: Manifest, df: pd.DataFrame, top: int = 3) -> list[tuple[str, str, str]]:
    """Rows for the retrain gate's table: the features of ``df`` that moved most from the
    serving model's reference (nothing when that model has no reference)."""
    if manifest.reference is None or df.empty:
        return []
    acc = Accumulator(manifest)
    acc.add(chunk_columns(manifest, df))
    return [
        (f"drift of the new data (PSI): {d.feature}", f"{d.psi:.3f}", "-")
        for d in acc.result().ranked()[:top]
        if d.psi is not None
    ]


def verdict(value: float | None) -> str:
    if value is None:
        return "no data"
    return "drifted" if value > DRIFTED else "moderate" if value > MODERATE else "stable"


def _bars(d: Drift) -> str:
    peak = max([*d.expected, *d.observed, 1e-9])
    rows = "".join(
        f"<tr><td>{html.escape(b)}</td><td>{e:.1%}</td><td>{o:.1%}</td><td>"
        f'<div class="e" style="width:{200 * e / peak:.0f}px"></div>'
        f'<div class="o" style="width:{200 * o / peak:.0f}px"></div></td></tr>'
        for b, e, o in zip(d.buckets, d.expected, d.observed, strict=True)
    )
    ks = "-" if d.ks is None else f"{d.ks:.3f}"
    psi_text = "-" if d.psi is None else f"{d.psi:.3f}"
    return (
        f"<h2>{html.escape(d.feature)} <small>{html.escape(d.kind)}: PSI {psi_text} "
        f"({verdict(d.psi)}), KS {ks}</small></h2><table><tr><th>bucket</th><th>expected</th>"
        f"<th>observed</th><th></th></tr>{rows}</table>"
    )


def write_html(result: DriftResult, path: Path) -> None:
    """The report: one histogram per feature (largest PSI first), written atomically."""
    style = (
        "body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}"
        ".e,.o{height:7px;margin:1px 0}.e{background:#999}.o{background:#d62728}"
    )
    parts = [d for d in [result.score] if d] + result.ranked()
    body = "".join(_bars(d) for d in parts)
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>drift {html.escape(result.model)}"
        f"</title><style>{style}</style></head><body><h1>Drift of {result.records} records "
        f"against {html.escape(result.model)} {html.escape(result.version)}</h1><p>grey: "
        f"expected (calibration data); red: observed. PSI above {DRIFTED}: drifted.</p>"
        f"{body}</body></html>"
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(doc)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
