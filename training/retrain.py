"""Retraining: the serving model again, fitted on new data, promoted only through a gate.

A retrain keeps the model's identity: it starts from the serving version's training config
(name, exclusions, label column, target FPR, architecture, every hyper-parameter) and pins each
feature's type and transform as the serving version has them, so new data cannot re-infer them
differently; a flag overrides one setting. Its parent is the serving version.

**New data from the sink.** The service's sink (service/sink.py) keeps a uniform sample of the
records it scored, each with the serving model's verdict. The retrain trains (and stops early)
on the records the serving model did not flag, so anomalies it caught do not teach the new
model that they are normal; but it calibrates the threshold on a uniform sample of *all* of
them, flagged ones included. The threshold is the (1 − target) quantile of the scores of normal
traffic; normal traffic itself holds about a target's share of flags, so leaving them out of
the calibration would cut the upper tail short and put the threshold too low (more alarms than
the target). Traffic that is mostly normal, sampled uniformly, has the same upper quantiles as
normal traffic up to the few true anomalies in it, which only make the threshold a little more
conservative.

**The gate** (decided on data neither model was fitted or calibrated on):

- unlabelled data must look like normal traffic to the serving model: it may flag it at most
  ``max_flagged`` (3 × the target) and more only by chance. A binomial tail bound says whether
  chance can explain the count, so a small sample does not false-alarm. Otherwise the data is
  refused before training, unless forced: a model fitted on anomalies as "normal" learns not to
  see them, and its own false-positive rate on that data would look fine;
- the new model's false-positive rate on a held-out slice of the new data;
- with labelled anomalies, its ROC-AUC against the serving model's;
- its feature schema must be the serving version's (``allow_schema_change`` to accept a change:
  the service refuses such a version unless told to accept it).

The decision (each check, its figures, the data) is written into the new version as
``gate.json`` before the version enters the registry.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import torch
from onnx import numpy_helper

from service.api import with_time_features
from service.bundle import Bundle, Manifest, read_bundle, schema_changes
from service.drift_report import drift_table
from service.features import encode_columns
from service.registry import GATE_FILE, Registry, write_json_atomic
from service.runtime import OnnxModel
from service.sink import META_COLUMNS, VERDICT
from training import calibrate
from training.config import TrainConfig
from training.data import DataError, column_values, fingerprint, read_table
from training.train import Result, train_bundle

FLAGGED_FACTOR = 3.0  # default most the serving model may flag on new data, times its target
FLAGGED_P = 1e-3  # ... beyond which chance must be this unlikely to explain the count


def serving_weights(bundle: Bundle) -> dict[str, torch.Tensor]:
    """The VAE's weights, read back from the ONNX initializers of a bundle (no code is loaded)."""
    model = onnx.load(str(bundle.model_path))
    return {
        init.name.removeprefix("vae."): torch.from_numpy(numpy_helper.to_array(init).copy())
        for init in model.graph.initializer
        if init.name.startswith("vae.")
    }


def inherited_config(parent: Manifest) -> dict[str, Any]:
    """The serving version's training settings, as the base of a retrain's config: its config,
    its name, and each feature's type and transform as it was fitted."""
    known = set(TrainConfig.model_fields)
    base = {k: v for k, v in parent.config.items() if k in known}
    pinned = {
        f.name: {"type": f.kind, "transform": getattr(f, "transform", None)}
        for f in parent.features
    }
    base["columns"] = {**(base.get("columns") or {}), **pinned}
    base["name"] = parent.name
    return base


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Retrained:
    result: Result | None  # None: the data was refused before training
    version: str | None
    parent: str | None
    promoted: bool
    passed: bool
    checks: list[Check] = field(default_factory=list)
    table: list[tuple[str, str, str]] = field(default_factory=list)  # (measure, serving, new)
    schema_changes: list[str] = field(default_factory=list)


@dataclass
class NewData:
    normal: pd.DataFrame  # records taken as normal (label 0, or unlabelled)
    anomalies: pd.DataFrame  # labelled anomalies (empty without labels)
    flagged: np.ndarray | None  # per normal record: flagged when served (sink data only)
    rows: int  # records read (after --window)


def _scores(bundle: Bundle, df: pd.DataFrame) -> np.ndarray | None:
    """Default-type scores of ``df`` under ``bundle``; None if the data lacks its features."""
    feats = bundle.manifest.features
    df = with_time_features(df, bundle.manifest)
    if any(f.name not in df.columns for f in feats):
        return None
    cols = {f.name: column_values(df[f.name], f.name, f.kind)[1] for f in feats}
    out = OnnxModel(bundle.model_path).run(encode_columns(feats, cols).inputs)
    return np.asarray(out[bundle.manifest.default_score], dtype=np.float64)


def _flags(bundle: Bundle, df: pd.DataFrame) -> np.ndarray | None:
    s = _scores(bundle, df)
    m = bundle.manifest
    return None if s is None else s > m.thresholds[m.default_score].value


def binomial_tail_bound(k: int, n: int, p: float) -> float:
    """An upper bound on P(X ≥ k) for X ~ Binomial(n, p) (Chernoff: exp(−n·KL(k/n ‖ p)))."""
    q = k / n
    if q <= p:
        return 1.0
    kl = -math.log(p) if q >= 1 else q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    return math.exp(-n * kl)


def read_new_data(
    data: str | Path, cfg: TrainConfig, parent: Manifest | None, window: int | None
) -> tuple[NewData, TrainConfig]:
    """The new records split by label, with the sink's verdicts; and the config fitted to them:
    inherited settings that name a column the data lacks (an id the sink did not see, the label
    of unlabelled data, a removed feature) do not stop the retrain."""
    df = read_table(data)
    if window is not None:
        if window < 1:
            raise DataError("--window must be at least 1")
        df = df.tail(window).reset_index(drop=True)
    flagged = df[VERDICT].eq(True).to_numpy() if VERDICT in df.columns else None
    df = df.drop(columns=[c for c in META_COLUMNS if c in df.columns])
    old = parent.config if parent else {}
    for c in cfg.exclude:
        if c not in df.columns and c in (old.get("exclude") or []):
            df[c] = None  # an inherited id column the new data does not carry
    pinned = {f.name for f in parent.features} if parent else set()
    columns = {c: v for c, v in cfg.columns.items() if c in df.columns or c not in pinned}
    cfg = cfg.model_copy(update={"columns": columns})
    label = cfg.label_column
    anomalies = df.iloc[:0]
    if label and label not in df.columns:
        if label != old.get("label_column"):
            raise DataError(f"label column {label!r} is not in the data")
        df[label] = 0  # inherited, and this data has no labels: all taken as normal
    elif label:
        lab = pd.to_numeric(df[label], errors="coerce")
        if not lab.isin([0, 1]).all():
            raise DataError(f"label column {label!r} must hold only 0 and 1")
        is_normal = (lab == 0).to_numpy()
        anomalies = df[~is_normal].reset_index(drop=True)
        flagged = flagged[is_normal] if flagged is not None else None
        df = df[is_normal].reset_index(drop=True)
    return NewData(df, anomalies, flagged, len(df) + len(anomalies)), cfg


def flagged_check(
    parent: Bundle, normal: pd.DataFrame, max_flagged: float | None
) -> tuple[Check, str] | None:
    """How much of the (unlabelled) new data the serving model flags, against its target."""
    flags = _flags(parent, normal)
    if flags is None:
        return None
    n, k = len(flags), int(flags.sum())
    target = parent.manifest.target_fpr
    limit = max_flagged if max_flagged is not None else FLAGGED_FACTOR * target
    bound = binomial_tail_bound(k, n, target)
    ok = k / n <= limit or bound >= FLAGGED_P
    detail = (
        f"{k / n:.2%} of {n} records ({k}); target {target:.2%}, limit {limit:.2%}; "
        f"P(so many by chance) <= {bound:.1e}"
    )
    figures = {"flagged": k, "records": n, "share": k / n, "target_fpr": target}
    figures |= {"limit": limit, "chance_bound": bound, "chance_limit": FLAGGED_P}
    check = Check("new data looks normal to the serving model", ok, detail, figures)
    return check, f"{k / n:.4f}"


def _fpr_check(
    new: Bundle, parent: Bundle | None, gate: pd.DataFrame, max_fpr: float | None
) -> tuple[Check, tuple[str, str, str]]:
    target = new.manifest.target_fpr
    n = len(gate)
    sd = math.sqrt(target * (1 - target) / n)
    limit = max_fpr if max_fpr is not None else max(2 * target, target + 3 * sd)
    new_flags = _flags(new, gate)
    assert new_flags is not None
    fpr = float(new_flags.mean())
    old_flags = _flags(parent, gate) if parent else None
    old = "-" if old_flags is None else f"{float(old_flags.mean()):.4f}"
    check = Check(
        "false-positive rate on held-out new normal data",
        fpr <= limit,
        f"{fpr:.4f} (limit {limit:.4f}, target {target:g}, {n} records)",
        {"fpr": fpr, "limit": limit, "target_fpr": target, "records": n},
    )
    return check, ("false-positive rate (held-out new normals)", old, f"{fpr:.4f}")


def _auc_rows(
    new: Bundle, parent: Bundle | None, gate: pd.DataFrame, anomalies: pd.DataFrame, margin: float
) -> tuple[list[Check], list[tuple[str, str, str]]]:
    new_gate, new_anom = _scores(new, gate), _scores(new, anomalies)
    assert new_gate is not None and new_anom is not None
    new_auc = calibrate.roc_auc(new_gate, new_anom)
    new_thr = new.manifest.thresholds[new.manifest.default_score].value
    checks, old = [], "-"
    old_gate = _scores(parent, gate) if parent else None
    old_anom = _scores(parent, anomalies) if parent else None
    if old_gate is not None and old_anom is not None:
        old_auc = calibrate.roc_auc(old_gate, old_anom)
        old = f"{old_auc:.4f}"
        checks.append(
            Check(
                "ROC-AUC not worse than the serving model's",
                new_auc >= old_auc - margin,
                f"{new_auc:.4f} vs {old_auc:.4f} (margin {margin:g})",
                {"new": new_auc, "serving": old_auc, "margin": margin},
            )
        )
    recall = f"{float((new_anom > new_thr).mean()):.4f}"
    return checks, [
        ("ROC-AUC (held-out normals vs labelled anomalies)", old, f"{new_auc:.4f}"),
        ("recall at threshold (labelled anomalies)", "-", recall),
    ]


def _schema_check(new: Bundle, parent: Bundle | None, allow: bool) -> tuple[Check, list[str]]:
    changes = schema_changes(parent.manifest, new.manifest) if parent else []
    detail = "; ".join(changes) if changes else "same features as the serving version"
    if changes and allow:
        detail += " (allowed: --allow-schema-change)"
    check = Check("features clients send unchanged", not changes or allow, detail)
    check.figures = {"changes": changes, "allowed": allow}
    return check, changes


def retrain(
    data: str | Path,
    registry: Registry,
    cfg: TrainConfig,
    *,
    warm_start: bool = False,
    window: int | None = None,
    gate_fraction: float = 0.2,
    max_fpr: float | None = None,
    max_flagged: float | None = None,
    auc_margin: float = 0.02,
    allow_schema_change: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Retrained:
    """Fit a new version on ``data``, gate it against the serving one, promote if it passes.

    ``cfg`` is the retrain's config (see :func:`inherited_config`). Unlabelled data that the
    serving model flags far above its target is refused before training (``force`` trains on
    it anyway). The new version is registered with its ``gate.json`` either way; it is promoted
    when the gate passes, or with ``force`` (a schema change needs ``allow_schema_change``).
    """
    serving = registry.serving()
    parent = registry.read(serving) if serving else None
    new_data, cfg = read_new_data(data, cfg, parent.manifest if parent else None, window)
    pre, table = _pre_check(parent, new_data, max_flagged)
    if any(not c.passed for c in pre) and not force:
        return Retrained(None, None, serving, False, False, pre, table)
    gate, train_rows = _hold_out_gate(new_data.normal, gate_fraction, cfg.seed + 100)
    init = None
    if warm_start:
        if parent is None:
            raise DataError("--warm-start needs a serving version to start from")
        init = serving_weights(parent)
    source = f"{Path(data).name}" + (f" (last {window} records)" if window else "")
    result = train_bundle(
        new_data.normal.iloc[train_rows].reset_index(drop=True),
        registry.staging_path,
        cfg,
        source=source,
        data_fingerprint=fingerprint(data),
        progress=progress,
        parent_version=serving,
        init_weights=init,
        trainable=None if new_data.flagged is None else ~new_data.flagged[train_rows],
    )
    return _gate_and_add(
        registry,
        result,
        parent,
        new_data,
        gate,
        pre,
        table,
        max_fpr=max_fpr,
        auc_margin=auc_margin,
        allow_schema_change=allow_schema_change,
        force=force,
    )


def _pre_check(
    parent: Bundle | None, new_data: NewData, max_flagged: float | None
) -> tuple[list[Check], list[tuple[str, str, str]]]:
    """Before training: unlabelled new data the serving model flags far above its target
    (checks and table rows; both empty when there is nothing to check)."""
    if parent is None or len(new_data.anomalies):
        return [], []
    flagged = flagged_check(parent, new_data.normal, max_flagged)
    if flagged is None:
        return [], []
    return [flagged[0]], [("flagged by the serving model (all new data)", flagged[1], "-")]


def _hold_out_gate(
    normal: pd.DataFrame, gate_fraction: float, seed: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """A seeded sample of the new normal records kept out of training for the gate, and the
    rows left to train on (both in the data's order)."""
    perm = np.random.default_rng(seed).permutation(len(normal))
    n_gate = max(1, round(gate_fraction * len(normal)))
    gate = normal.iloc[np.sort(perm[:n_gate])].reset_index(drop=True)
    return gate, np.sort(perm[n_gate:])


def _gate_and_add(
    registry: Registry,
    result: Result,
    parent: Bundle | None,
    new_data: NewData,
    gate: pd.DataFrame,
    pre: list[Check],
    table: list[tuple[str, str, str]],
    *,
    max_fpr: float | None,
    auc_margin: float,
    allow_schema_change: bool,
    force: bool,
) -> Retrained:
    """Run the gate on the staged new version, write its decision into it, move it into the
    registry, promote it if it passed (or ``force``)."""
    staged = result.path
    serving = parent.manifest.version if parent else None
    try:
        new = read_bundle(staged)
        fpr, fpr_row = _fpr_check(new, parent, gate, max_fpr)
        schema, changes = _schema_check(new, parent, allow_schema_change)
        checks, rows = [*pre, schema, fpr], [fpr_row, *table]
        if len(new_data.anomalies):
            auc, auc_rows = _auc_rows(new, parent, gate, new_data.anomalies, auc_margin)
            checks += auc
            rows += auc_rows
        train_n = str(parent.manifest.data.train_rows) if parent else "-"
        rows.append(("training records", train_n, str(new.manifest.data.train_rows)))
        rows += drift_table(parent.manifest, new_data.normal) if parent else []  # why retrain
        passed = all(c.passed for c in checks)
        promote = (passed or force or parent is None) and (not changes or allow_schema_change)
        record = _gate_record(new, serving, new_data, len(gate), checks, rows, passed)
        write_json_atomic(staged / GATE_FILE, {**record, "promote": promote, "forced": force})
        version = new.manifest.version
        registry.add(version)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if promote:
        registry.promote(version, allow_schema_change=allow_schema_change)
    result.path = registry.version_path(version)
    return Retrained(result, version, serving, promote, passed, checks, rows, changes)


def _gate_record(
    new: Bundle,
    serving: str | None,
    new_data: NewData,
    gate_rows: int,
    checks: list[Check],
    table: list[tuple[str, str, str]],
    passed: bool,
) -> dict[str, Any]:
    m = new.manifest
    return {
        "version": m.version,
        "serving": serving,
        "decided_at": datetime.now(UTC).isoformat(),
        "passed": passed,
        "data": {
            "source": m.data.source,
            "fingerprint": m.data.fingerprint,
            "records": new_data.rows,
            "normal": len(new_data.normal),
            "labelled_anomalies": len(new_data.anomalies),
            "flagged_when_served": (
                None if new_data.flagged is None else int(new_data.flagged.sum())
            ),
            "held_out_for_gate": gate_rows,
            "trained_on": m.data.train_rows,
            "calibrated_on": m.data.calibration_rows,
        },
        "checks": [dataclasses.asdict(c) for c in checks],
        "table": [{"measure": a, "serving": b, "new": c} for a, b, c in table],
    }
