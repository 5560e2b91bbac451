"""Score records in your own Python process, no server: the library behind the bulk CLI and the
Spark job.

    from service.api import Model

    model = Model.load("models/payments")     # a bundle, or a registry (its serving version)
    out = model.score(df, explain=3)          # DataFrame in, DataFrame out (score columns)
    results = model.score_records([{...}])    # dicts in, the HTTP API's result objects out

``score`` takes a pandas DataFrame or a pyarrow Table and reads its columns by the same rules
as ``vae-anomaly score``; ``score_records`` takes JSON-like dicts and validates them exactly as
``POST /v1/score`` does (the same messages: :class:`service.errors.InvalidRecords`).
Needs the ``serve`` extra, plus pandas for ``score`` (the ``batch`` extra); never torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from service import tables
from service.bundle import Bundle, Manifest, read_bundle
from service.registry import Registry
from service.scoring import Scored, Scorer, top_features
from service.settings import Settings, load_settings

SCORE_COLUMNS = ("score", "is_anomaly", "percentile")


def resolve(path: str | os.PathLike[str]) -> Bundle:
    """A bundle directory, or a registry (its serving version)."""
    p = Path(path)
    if (p / "versions").is_dir():
        return Registry(p).read_serving()
    return read_bundle(p)


@dataclass
class FrameColumns:
    """A DataFrame's feature columns as the model's values, and what could not be read."""

    columns: dict[str, Any]
    unreadable: dict[str, int] = field(default_factory=dict)  # column -> values scored missing
    absent: list[str] = field(default_factory=list)  # nullable features the frame lacks


class SchemaError(ValueError):
    """A table that lacks a column the model needs."""


def check_schema(m: Manifest, column_names: list[str]) -> list[str]:
    """The nullable features a table lacks (scored as missing); raise SchemaError naming the
    required ones it lacks."""
    absent = [f.name for f in m.features if f.name not in column_names]
    required = [f.name for f in m.features if f.name in absent and not f.nullable]
    if required:
        raise SchemaError(f"no column(s) {required}, which the model needs")
    return absent


def frame_columns(m: Manifest, frame: pd.DataFrame) -> FrameColumns:
    """Feature values of ``frame`` by the bulk rules (see :mod:`service.tables`)."""
    out = FrameColumns(columns={}, absent=check_schema(m, list(map(str, frame.columns))))
    for f in m.features:
        if f.name in out.absent:
            categorical = f.kind == "categorical"
            out.columns[f.name] = np.full(
                len(frame), None if categorical else np.nan, dtype=object if categorical else float
            )
            continue
        s = frame[f.name]
        if f.kind == "categorical":
            out.columns[f.name] = tables.to_category(s)
            continue
        values, bad = tables.to_bool(s) if f.kind == "boolean" else tables.to_float(s)
        if bad.any():
            out.unreadable[f.name] = int(bad.sum())
        out.columns[f.name] = values
    return out


def score_type_of(m: Manifest, score_type: str | None) -> str:
    """``score_type``, or the model's default; ValueError if the model has no such score."""
    st = score_type or m.default_score
    if st not in m.score_types:
        raise ValueError(f"score type {st!r} is not one of {m.score_types}")
    return st


class Model:
    """One bundle, loaded once: an onnxruntime session and the manifest's tables."""

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

    def score_type(self, score_type: str | None) -> str:
        return score_type_of(self.manifest, score_type)

    def score(self, table: Any, *, score_type: str | None = None, explain: int = 0) -> pd.DataFrame:
        """``score``, ``is_anomaly``, ``percentile`` (and ``top_features`` when ``explain``)
        for each row of a DataFrame or Arrow table, on the table's index."""
        frame = table.to_pandas() if hasattr(table, "to_pandas") else table
        if len(frame) == 0:  # an empty partition, say: onnxruntime wants at least one row
            check_schema(self.manifest, list(map(str, frame.columns)))
            empty = {"score": float, "is_anomaly": bool, "percentile": float}
            return pd.DataFrame(
                {k: pd.Series(dtype=t) for k, t in empty.items()}, index=frame.index
            )
        cols = frame_columns(self.manifest, frame)
        scored = self.scorer.score(cols.columns, self.score_type(score_type), observe=False)
        return self.result_frame(scored, frame.index, explain)

    def result_frame(self, scored: Scored, index: pd.Index, explain: int) -> pd.DataFrame:
        out = pd.DataFrame(index=index)
        out["score"] = scored.score
        out["is_anomaly"] = scored.is_anomaly
        out["percentile"] = np.round(scored.percentile, 3)
        if explain > 0:
            tops = top_features(self.scorer.feature_names, scored, explain)
            out["top_features"] = [
                ", ".join(f"{t['name']}:{t['share']:g}" for t in top) for top in tops
            ]
        return out

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
        from service.native import records_to_columns, results_json

        s = settings or load_settings(max_records=max(1, len(records)))
        columns, _ = records_to_columns({"records": records}, self.manifest, s)
        scored = self.scorer.score(columns, self.score_type(score_type), observe=False)
        results: list[dict[str, Any]] = results_json(self.scorer, scored, explain)["results"]
        return results
