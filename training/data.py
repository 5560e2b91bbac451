"""Reading training data, inferring column types and fitting the feature schema.

Everything here raises :class:`DataError` with a message meant for the person who gave the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from service import tables
from service.bundle import (
    MISSING_TOKEN,
    UNKNOWN_TOKEN,
    BooleanFeature,
    CategoricalFeature,
    ColumnUse,
    DateTimeColumn,
    NumericFeature,
    sha256_hex,
)
from service.errors import VaeAnomalyError
from service.values import Invalid
from training import calibrate
from training.columns import finish as columns_report
from training.columns import plan as columns_plan
from training.config import ColumnConfig, TrainConfig

Feature = NumericFeature | BooleanFeature | CategoricalFeature

MIN_ROWS = 50  # normal rows needed to train, validate and calibrate at all
MIN_CALIBRATION = calibrate.MIN_SCORES  # normal rows to set a threshold from


class DataError(VaeAnomalyError, ValueError):
    """Training data that cannot be used, with the reason."""


def read_table(path: str | Path) -> pd.DataFrame:
    """Read CSV (with a header), Parquet or JSON Lines, chosen by the file's extension; or a
    folder of JSON Lines files (such as the service's normal-record sink), in name order."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
        if not files:
            raise DataError(f"{p}: a folder, but with no .jsonl files in it")
        frames = [read_table(f) for f in files if f.stat().st_size > 0]
        if not frames:
            raise DataError(f"{p}: every .jsonl file in it is empty")
        return pd.concat(frames, ignore_index=True)
    kind = tables.file_format(p)
    if kind is None:
        raise DataError(f"{p}: " + tables.UNKNOWN_FORMAT.format(suffix=p.suffix))
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty")
    with p.open("rb") as f:
        head = f.read(8192)
    if kind == "parquet" and not head.startswith(b"PAR1"):
        raise DataError(f"{p}: not a Parquet file (it does not start with the Parquet magic)")
    if kind != "parquet" and b"\x00" in head:
        raise DataError(f"{p}: not a {kind.upper()} text file (it holds binary data)")
    try:
        if kind == "csv":
            df = pd.read_csv(p)
        elif kind == "parquet":
            df = pd.read_parquet(p)
        else:
            df = pd.read_json(p, lines=True, dtype=False)  # no guessing of date-times by name
    except Exception as e:  # each reader has its own error types
        raise DataError(f"{p}: cannot read it as {kind.upper()}: {e}") from e
    if len(df.columns) == 0 or len(df) == 0:
        raise DataError(f"{p}: no records in the file")
    if any(not isinstance(c, str) for c in df.columns):
        raise DataError(f"{p}: every column needs a name (a header row / JSON keys)")
    return df


def fingerprint(path: str | Path) -> str:
    """sha256 of the file (of the .jsonl files' digests, for a folder)."""
    p = Path(path)
    if p.is_dir():
        return sha256_hex("".join(fingerprint(f) for f in sorted(p.glob("*.jsonl"))).encode())
    with p.open("rb") as f:
        return sha256_hex(f)


def column_values(s: pd.Series, name: str, kind: str | None) -> tuple[str, np.ndarray]:
    """Infer (or apply the configured) type of a column; return it with normalized values.

    A column of numbers is numeric (even one holding only 0 and 1); only true/false values
    (or the words of ``service.values``) make a boolean column; anything else is categorical.
    """
    if kind is None:
        if tables.is_boolean(s):
            kind = "boolean"
        elif pd.api.types.is_numeric_dtype(s.dtype):
            kind = "numeric"
        else:
            kind = "categorical"
    values, errors = tables.column(kind, s)
    if kind == "boolean" and not errors:
        other = np.flatnonzero(~np.isnan(values) & (values != 0) & (values != 1))
        errors = {int(i): Invalid("wrong_type", "not true or false") for i in other}
    if errors:
        row = min(errors)
        cell = s.iloc[row : row + 1].tolist()[0]  # a Python value, shown as the file has it
        raise DataError(
            f"column {name!r} is {kind} but holds {cell!r} (row {row}): {errors[row].message}"
        )
    return kind, values


def signed_log(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.sign(x) * np.log1p(np.abs(x)))


def _skew(x: np.ndarray) -> float:
    sd = x.std()
    return 0.0 if sd == 0 else float(np.mean(((x - x.mean()) / sd) ** 3))


def _robust_scale(t: np.ndarray) -> tuple[float, float]:
    center = float(np.median(t))
    q75, q25 = np.percentile(t, [75, 25])
    scale = float(q75 - q25) / 1.349
    if scale <= 1e-9 * max(1.0, abs(center)):
        scale = float(t.std())
    return center, scale


@dataclass
class Prepared:
    """Normal records split three ways, anomalies (if labelled), and the fitted feature schema."""

    features: list[Feature]
    columns: dict[str, np.ndarray]  # feature name -> normalized values of all normal rows
    anomalies: dict[str, np.ndarray]  # same for labelled anomaly rows (may be empty arrays)
    train_idx: np.ndarray
    val_idx: np.ndarray
    calib_idx: np.ndarray
    warnings: list[str]
    ignored: list[str]  # columns not used: excluded, the label, ids, dropped
    datetimes: list[DateTimeColumn]  # date-time columns the model derives features from
    report: list[ColumnUse]  # every column of the data: used or not, how, why
    colors: np.ndarray | None = None  # the color column of the normal rows (explorer map)

    @property
    def n_anomalies(self) -> int:
        return len(next(iter(self.anomalies.values()))) if self.anomalies else 0


def prepare(df: pd.DataFrame, cfg: TrainConfig, trainable: np.ndarray | None = None) -> Prepared:
    """Validate the records, split them and fit the feature schema on the training split.

    ``trainable`` (one bool per normal row; a retrain from the sink: not flagged when served)
    limits the training and validation rows; the calibration rows stay a uniform sample of all.
    """
    extra = [c for c in (cfg.label_column, cfg.color_column) if c]
    _check_named_columns(df, cfg, extra)
    is_anomaly = _anomaly_mask(df, cfg)
    used = [c for c in df.columns if c not in cfg.exclude and c not in extra]
    if not used:
        raise DataError("no feature columns left after exclusions")
    normal = df.loc[~is_anomaly, used].reset_index(drop=True)
    colors = (
        df.loc[~is_anomaly, cfg.color_column].astype(str).to_numpy() if cfg.color_column else None
    )
    anomalous = df.loc[is_anomaly, used].reset_index(drop=True)
    if len(normal) < MIN_ROWS:
        raise DataError(
            f"{len(normal)} normal record(s); at least {MIN_ROWS} are needed to "
            "train, validate and calibrate"
        )
    plan = columns_plan(normal, anomalous, cfg)  # date-times -> time features; ids out
    normal, anomalous, notes = plan.normal, plan.anomalous, plan.notes
    train_idx, val_idx, calib_idx = _split_rows(len(normal), cfg, trainable)

    dropped: dict[str, tuple[str, str]] = {}  # column -> (type, why), for the column report
    specs: list[tuple[str, dict[str, Any]]] = []  # (kind, fields) of each kept column
    columns: dict[str, np.ndarray] = {}
    anomalies: dict[str, np.ndarray] = {}
    for name in normal.columns:
        cc = plan.overrides.get(name) or cfg.columns.get(name)
        kind, values = column_values(normal[name], name, cc.type if cc else None)
        fitted = _fit_column(kind, name, values, train_idx, calib_idx, cc, cfg, notes)
        if isinstance(fitted, str):
            dropped[name] = (kind, fitted)
            continue
        specs.append((kind, fitted))
        columns[name] = values
        if len(anomalous):
            anomalies[name] = column_values(anomalous[name], name, kind)[1]
        else:
            anomalies[name] = values[:0]
    if not specs:
        raise DataError("no usable feature columns (all were constant or dropped)")
    features = _schema_order(specs)
    datetimes, report = columns_report(plan, list(map(str, df.columns)), features, dropped, cfg)
    return Prepared(
        features=features,
        columns=columns,
        anomalies=anomalies,
        train_idx=train_idx,
        val_idx=val_idx,
        calib_idx=calib_idx,
        warnings=notes,
        ignored=[c.name for c in report if not c.used],
        datetimes=datetimes,
        report=report,
        colors=colors,
    )


def _check_named_columns(df: pd.DataFrame, cfg: TrainConfig, extra: list[str]) -> None:
    """Every column the config names (excluded, label, color, typed) must be in the data."""
    for col in [*cfg.exclude, *extra]:
        if col not in df.columns:
            raise DataError(
                f"column {col!r} (excluded or label) is not in the data; "
                f"columns are {list(df.columns)}"
            )
    for col in cfg.columns:
        if col not in df.columns:
            raise DataError(f"config names column {col!r}, which is not in the data")


def _anomaly_mask(df: pd.DataFrame, cfg: TrainConfig) -> np.ndarray:
    """One bool per row: labelled anomalous (all False without a label column)."""
    if not cfg.label_column:
        return np.zeros(len(df), dtype=bool)
    lab = df[cfg.label_column]
    ok = lab.notna() & lab.astype(str).str.strip().isin(["0", "1", "0.0", "1.0", "True", "False"])
    if not ok.all():
        bad = lab[~ok].iloc[0]
        raise DataError(
            f"label column {cfg.label_column!r} must hold only 0 and 1; "
            f"found {bad!r} in row {int(np.flatnonzero(~ok.to_numpy())[0])}"
        )
    return np.asarray(lab.astype(str).str.strip().isin(["1", "1.0", "True"]).to_numpy())


def _split_rows(
    n: int, cfg: TrainConfig, trainable: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, calibration) row indices of the ``n`` normal rows, seeded."""
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    n_val = max(1, round(cfg.validation_fraction * n))
    n_cal = max(1, round(cfg.calibration_fraction * n))
    val_idx, calib_idx, train_idx = perm[:n_val], perm[n_val : n_val + n_cal], perm[n_val + n_cal :]
    if n_cal < MIN_CALIBRATION:
        raise DataError(
            f"{n_cal} calibration record(s) ({cfg.calibration_fraction:g} of {n}); at "
            f"least {MIN_CALIBRATION} are needed: give more records or a larger "
            "calibration_fraction"
        )
    if trainable is not None:
        val_idx, train_idx = val_idx[trainable[val_idx]], train_idx[trainable[train_idx]]
        if len(train_idx) < MIN_ROWS // 2 or not len(val_idx):
            raise DataError(f"{len(train_idx)} unflagged record(s) to train on; too few")
    return train_idx, val_idx, calib_idx


def _fit_column(
    kind: str,
    name: str,
    values: np.ndarray,
    train_idx: np.ndarray,
    calib_idx: np.ndarray,
    cc: ColumnConfig | None,
    cfg: TrainConfig,
    notes: list[str],
) -> dict[str, Any] | str:
    """The feature fields of one column fitted on the training rows, or why it is dropped.

    Notes for the person training (dropped, rare values folded) are appended to ``notes``.
    """
    missing = np.array([v is None for v in values]) if kind == "categorical" else np.isnan(values)
    if missing.all():  # nothing to learn, as from a constant column: dropped, not refused
        notes.append(f"column {name!r} is missing in every record; dropped")
        return "missing in every record"
    tr, tr_missing = values[train_idx], missing[train_idx]
    if kind == "numeric":
        fitted = _fit_numeric(tr[~tr_missing].astype(float), cc)
    elif kind == "boolean":
        fitted = _fit_boolean(tr[~tr_missing], tr_missing)
    else:
        fitted = _fit_categorical(name, tr[~tr_missing], tr_missing, values[calib_idx], cfg, notes)
    if fitted == "constant":
        notes.append(f"column {name!r} is constant; dropped")
    if isinstance(fitted, str):
        return fitted
    return {"name": name, "nullable": bool(missing.any()), **fitted}


def _fit_numeric(present: np.ndarray, cc: ColumnConfig | None) -> dict[str, Any] | str:
    """Transform (configured, or log when that makes the values less skewed) and scaling."""
    if len(np.unique(present)) <= 1:
        return "constant"
    transform = cc.transform if cc and cc.transform else None
    if transform is None:
        s_raw, s_log = _skew(present), _skew(signed_log(present))
        transform = "log" if abs(s_raw) > 1 and abs(s_log) < abs(s_raw) else "none"
    t = signed_log(present) if transform == "log" else present
    center, scale = _robust_scale(t)
    return {
        "transform": transform,
        "center": center,
        "scale": scale,
        "impute": float(np.median(present)),
        "min": float(present.min()),
        "max": float(present.max()),
    }


def _fit_boolean(present: np.ndarray, tr_missing: np.ndarray) -> dict[str, Any] | str:
    rate = float(present.mean())
    if rate in (0.0, 1.0) and not tr_missing.any():
        return "constant"
    return {"rate": rate}


def _fit_categorical(
    name: str,
    present: np.ndarray,
    tr_missing: np.ndarray,
    calib: np.ndarray,
    cfg: TrainConfig,
    notes: list[str],
) -> dict[str, Any] | str:
    """The vocabulary: values seen often enough, the most common first, at most max_categories."""
    counts = pd.Series(present).value_counts(sort=True)
    kept = [str(v) for v, c in counts.items() if c >= cfg.min_category_count]
    kept = kept[: cfg.max_categories]
    if len(counts) <= 1 and not tr_missing.any():
        return "constant"
    if not kept:
        notes.append(
            f"column {name!r}: no value repeats (an id?); dropped — exclude it "
            f"with --exclude {name}"
        )
        return "no value repeats"
    if len(counts) > len(kept):
        folded = int(counts.iloc[len(kept) :].sum())  # counts is sorted, kept a prefix
        notes.append(
            f"column {name!r}: {len(counts) - len(kept)} rare value(s) "
            f"({folded} record(s)) map to {UNKNOWN_TOKEN}"
        )
    # how often held-out normal records bring a value the vocabulary lacks (label-free)
    known = set(kept)
    unseen = sum(1 for v in calib if v is not None and v not in known)
    return {
        "categories": [UNKNOWN_TOKEN, MISSING_TOKEN, *kept],
        "unseen_rate": unseen / max(1, len(calib)),
    }


def _schema_order(specs: list[tuple[str, dict[str, Any]]]) -> list[Feature]:
    """The schema lists real-valued, then boolean (together: x_num), then categorical (x_cat)."""
    features: list[Feature] = []
    for kind, cls in (
        ("numeric", NumericFeature),
        ("boolean", BooleanFeature),
        ("categorical", CategoricalFeature),
    ):
        first = 0 if kind != "boolean" else len(features)
        features += [
            cls(column=first + i, **sp) for i, sp in enumerate(sp for k, sp in specs if k == kind)
        ]
    return features
