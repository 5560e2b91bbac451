"""Score records in your own Python process, no server: the library behind the bulk CLI and the
Spark job.

    from service.api import Model

    model = Model.load("models/payments")     # a bundle, or a registry (its serving version)
    out = model.score(df, explain=3)          # DataFrame in, DataFrame of results out
    results = model.score_records([{...}])    # dicts in, the HTTP API's result objects out

``score`` takes a pandas DataFrame or a pyarrow Table and reads its cells by the rules every
entry point shares (service/values.py): a value the model never saw is scored and named in
``unusual``; a cell that cannot be a value of its column leaves its row unscored, saying why in
``error``. ``score_records`` takes JSON-like dicts and validates them exactly as
``POST /v1/score`` does (the same messages: :class:`service.errors.InvalidRecords`).
Needs the ``serve`` extra, plus pandas for ``score`` (the ``batch`` extra); never torch.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from service import latent, tables, timefeatures, values
from service.bundle import Bundle, Manifest, client_fields, read_bundle
from service.errors import VaeAnomalyError
from service.registry import Registry
from service.scoring import Scored, Scorer, top_features
from service.settings import Settings, load_settings

OUTPUTS = ("score", "is_anomaly", "percentile", "unusual", "error")  # the result columns


class SchemaError(VaeAnomalyError, ValueError):
    """A table that lacks a column the model needs, or a score type the model lacks."""


def resolve(path: str | os.PathLike[str]) -> Bundle:
    """A bundle directory, or a registry (its serving version)."""
    p = Path(path)
    if (p / "versions").is_dir():
        return Registry(p).read_serving()
    return read_bundle(p)


def score_type_of(m: Manifest, score_type: str | None) -> str:
    """``score_type``, or the model's default; SchemaError if the model has no such score."""
    st = score_type or m.default_score
    if st not in m.score_types:
        raise SchemaError(f"score type {st!r} is not one of {m.score_types}")
    return st


def check_schema(m: Manifest, column_names: list[str]) -> None:
    """Raise SchemaError naming the required fields a table lacks (a nullable one that is
    absent is scored as missing; a date-time field stands for the features derived from it),
    or the columns it holds twice (a Parquet file may: which one is the value is unclear)."""
    twice = sorted(c for c, n in Counter(column_names).items() if n > 1)
    if twice:
        raise SchemaError(f"column(s) {twice[:10]} appear more than once; give each one name")
    fields = client_fields(m)
    required = [n for n, (_, nullable) in fields.items() if n not in column_names and not nullable]
    if required:
        raise SchemaError(f"no column(s) {required}, which the model needs")


def with_time_features(
    frame: pd.DataFrame, m: Manifest, errors: dict[int, str] | None = None
) -> pd.DataFrame:
    """The frame with each date-time column's time features added (service/timefeatures.py);
    a cell that is not a date-time is missing there, and added to ``errors`` (row -> why)."""
    found: dict[int, str] = {} if errors is None else errors
    for col in m.datetime_columns:
        if col.name in frame.columns:
            derived, bad = timefeatures.derive(frame[col.name].tolist(), col)
            frame = frame.assign(**derived)
            for i, e in bad:
                found[i] = (found[i] + "; " if i in found else "") + f"{col.name}: {e.message}"
    return frame


def frame_columns(m: Manifest, frame: pd.DataFrame, errors: dict[int, str]) -> dict[str, Any]:
    """Each feature's values by the service's rules; an absent column is missing; each invalid
    cell is added to ``errors`` (row position -> why)."""
    columns: dict[str, Any] = {}
    for f in m.features:
        if f.name not in frame.columns:
            categorical = f.kind == "categorical"
            columns[f.name] = np.full(
                len(frame), None if categorical else np.nan, dtype=object if categorical else float
            )
            continue
        columns[f.name], bad = tables.column(f.kind, frame[f.name])
        for i, e in bad.items():
            errors[i] = (errors[i] + "; " if i in errors else "") + f"{f.name}: {e.message}"
    return columns


def _unusual_text(m: Manifest, scored: Scored, columns: dict[str, Any]) -> list[str | None]:
    """Per row: the unusual values as ``field=value (why)``, joined by "; " (None: none)."""
    out: list[str | None] = [None] * len(scored.score)
    feats = {f.name: f for f in m.features}
    for name, kind, rows in scored.unusual:
        why = values.why(feats[name], kind)
        for i in rows.nonzero()[0].tolist():
            text = f"{name}={_show(columns[name][i])} ({why})"
            out[i] = text if out[i] is None else f"{out[i]}; {text}"
    return out


def _show(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "null"
    return repr(v) if isinstance(v, str) else f"{float(v):g}"


class Model:
    """One bundle, loaded once: the service's scorer (onnxruntime session, thresholds,
    percentiles), without its metrics."""

    def __init__(self, bundle: Bundle, *, threads: int = 1) -> None:
        self.scorer = Scorer(bundle, threads=threads)
        self.manifest = self.scorer.manifest
        self.path = bundle.path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, threads: int = 1) -> Model:
        """A bundle directory, or a registry's serving version."""
        return cls(resolve(path), threads=threads)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def score(self, table: Any, *, score_type: str | None = None, explain: int = 0) -> pd.DataFrame:
        """One row of results per row of a DataFrame or Arrow table, on the table's index:
        ``score``, ``is_anomaly``, ``percentile``, ``unusual`` and ``error`` (why a row could
        not be scored; its other columns are then empty), and ``top_features`` when
        ``explain`` > 0."""
        frame = table.to_pandas() if hasattr(table, "to_pandas") else table
        st = score_type_of(self.manifest, score_type)
        return self.score_frame(frame, {}, st, explain)[0]

    def score_frame(
        self, frame: pd.DataFrame, bad: dict[int, str], score_type: str, explain: int = 0
    ) -> tuple[pd.DataFrame, dict[str, int]]:
        """:meth:`score` with rows already known bad (row position -> why: a JSON line that is
        no record, say); also returns the count of unusual values per column."""
        check_schema(self.manifest, list(map(str, frame.columns)))
        n = len(frame)
        errors = dict(bad)
        frame = with_time_features(frame, self.manifest, errors)
        columns = frame_columns(self.manifest, frame, errors)
        ok = np.ones(n, dtype=bool)
        ok[list(errors)] = False
        score, pct = np.full(n, np.nan), np.full(n, np.nan)
        flagged = pd.array([pd.NA] * n, dtype="boolean")  # not scored: no verdict
        unusual: list[str | None] = [None] * n
        tops: list[str | None] = [None] * n
        counts: dict[str, int] = {}
        if ok.any():
            valid = {k: v[ok] for k, v in columns.items()}
            scored = self.scorer.score(valid, score_type)
            rows = np.flatnonzero(ok).tolist()
            score[ok], pct[ok] = scored.score, np.round(scored.percentile, 3)
            flagged[ok] = scored.is_anomaly
            for i, text in zip(rows, _unusual_text(self.manifest, scored, valid), strict=True):
                unusual[i] = text
            counts = {name: int(r.sum()) for name, _, r in scored.unusual}
            if explain > 0:
                named = top_features(self.scorer.feature_names, scored, explain)
                latent.explain(scored.expected, named, valid)
                for i, top in zip(rows, named, strict=True):
                    tops[i] = ", ".join(map(latent.explanation_text, top))
        out = pd.DataFrame({"score": score, "is_anomaly": flagged, "percentile": pct})
        out["unusual"] = pd.array(unusual, dtype=object)
        out["error"] = pd.array([errors.get(i) for i in range(n)], dtype=object)
        if explain > 0:
            out["top_features"] = pd.array(tops, dtype=object)
        out.index = frame.index
        return out, counts

    def score_records(
        self,
        records: list[dict[str, Any]],
        *,
        score_type: str | None = None,
        explain: int = 3,
        settings: Settings | None = None,
    ) -> list[dict[str, Any]]:
        """The HTTP API's results for JSON-like records, validated as ``POST /v1/score``
        validates them (raises :class:`service.errors.InvalidRecords`)."""
        # lazy: the HTTP layer (FastAPI, prometheus-client) only for this method
        from service.native import results_json
        from service.records import records_to_columns

        s = settings or load_settings(max_records=max(1, len(records)))
        st = score_type_of(self.manifest, score_type)
        parsed = records_to_columns({"records": records}, self.scorer.records, s)
        scored = self.scorer.score(parsed.columns, st)
        results: list[dict[str, Any]] = results_json(self.scorer, parsed, scored, explain, st)[
            "results"
        ]
        return results
