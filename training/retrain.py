"""Retraining on new normal data, with a promotion gate against the serving version."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import torch
from onnx import numpy_helper

from service.batch import with_time_features
from service.bundle import Bundle
from service.features import encode_columns
from service.registry import Registry
from service.runtime import OnnxModel
from training import calibrate
from training.config import TrainConfig
from training.data import DataError, column_values, fingerprint, read_table
from training.train import Result, train_bundle


def serving_weights(bundle: Bundle) -> dict[str, torch.Tensor]:
    """The VAE's weights, read back from the ONNX initializers of a bundle (no code is loaded)."""
    model = onnx.load(str(bundle.model_path))
    return {
        init.name.removeprefix("vae."): torch.from_numpy(numpy_helper.to_array(init).copy())
        for init in model.graph.initializer
        if init.name.startswith("vae.")
    }


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Retrained:
    result: Result
    version: str
    parent: str | None
    promoted: bool
    passed: bool
    checks: list[Check] = field(default_factory=list)
    table: list[tuple[str, str, str]] = field(default_factory=list)  # (measure, serving, new)


def _scores(bundle: Bundle, df: pd.DataFrame) -> np.ndarray | None:
    """Default-type scores of ``df`` under ``bundle``; None if the data lacks its features."""
    feats = bundle.manifest.features
    df = with_time_features(df, bundle.manifest)[0]
    if any(f.name not in df.columns for f in feats):
        return None
    cols = {f.name: column_values(df[f.name], f.name, f.kind)[1] for f in feats}
    out = OnnxModel(bundle.model_path).run(encode_columns(feats, cols).inputs)
    return np.asarray(out[bundle.manifest.default_score], dtype=np.float64)


def retrain(
    data: str | Path,
    registry: Registry,
    cfg: TrainConfig,
    *,
    warm_start: bool = False,
    window: int | None = None,
    gate_fraction: float = 0.2,
    max_fpr: float | None = None,
    auc_margin: float = 0.02,
    force: bool = False,
    progress: bool = True,
) -> Retrained:
    """Fit a new version on ``data``, gate it against the serving one, promote if it passes.

    The gate uses a held-out slice (``gate_fraction``) of the new normal records, which neither
    model was fitted or calibrated on: the new model's false-positive rate there must be at most
    ``max_fpr`` (default: the larger of twice the target and the target plus three binomial
    standard deviations), and, when the data has labelled anomalies, its ROC-AUC must not be
    below the serving model's by more than ``auc_margin``. The new version is registered either
    way; it is promoted when the gate passes, or with ``force``.
    """
    df = read_table(data)
    if window is not None:
        if window < 1:
            raise DataError("--window must be at least 1")
        df = df.tail(window).reset_index(drop=True)
    label = cfg.label_column
    anomalies = pd.DataFrame()
    if label:
        if label not in df.columns:
            raise DataError(f"label column {label!r} is not in the data")
        lab = pd.to_numeric(df[label], errors="coerce")
        if not lab.isin([0, 1]).all():
            raise DataError(f"label column {label!r} must hold only 0 and 1")
        anomalies = df[lab == 1].reset_index(drop=True)
        df = df[lab == 0].reset_index(drop=True)
    rng = np.random.default_rng(cfg.seed + 100)
    perm = rng.permutation(len(df))
    n_gate = max(1, round(gate_fraction * len(df)))
    gate = df.iloc[np.sort(perm[:n_gate])].reset_index(drop=True)
    train_df = df.iloc[np.sort(perm[n_gate:])].reset_index(drop=True)

    serving = registry.serving()
    parent = registry.read(serving) if serving else None
    init = None
    cfg = dataclasses.replace(
        cfg, label_column=None, exclude=[*cfg.exclude, *([label] if label else [])]
    )
    if warm_start:
        if parent is None:
            raise DataError("--warm-start needs a serving version to start from")
        init = serving_weights(parent)
        # same sizes as the parent, so its weights fit
        cfg = dataclasses.replace(
            cfg,
            hidden=cfg.hidden or parent.manifest.config.get("hidden"),
            latent=cfg.latent or parent.manifest.config.get("latent"),
        )
    source = f"{Path(data).name}" + (f" (last {window} records)" if window else "")
    result = train_bundle(
        train_df,
        registry.version_path,
        cfg,
        source=source,
        data_fingerprint=fingerprint(data),
        progress=progress,
        parent_version=serving,
        init_weights=init,
    )
    version = result.manifest.version
    new = registry.read(version)
    m = new.manifest
    target = m.target_fpr
    limit = (
        max_fpr
        if max_fpr is not None
        else max(2 * target, target + 3 * math.sqrt(target * (1 - target) / len(gate)))
    )

    new_gate = _scores(new, gate)
    assert new_gate is not None
    new_thr = m.thresholds[m.default_score].value
    new_fpr = float((new_gate > new_thr).mean())
    checks = [
        Check(
            "false-positive rate on held-out new normal data",
            new_fpr <= limit,
            f"{new_fpr:.4f} (limit {limit:.4f}, target {target:g}, {len(gate)} records)",
        )
    ]
    table = [("false-positive rate (held-out new normals)", "-", f"{new_fpr:.4f}")]
    old_gate = _scores(parent, gate) if parent else None
    if parent is not None and old_gate is not None:
        old_thr = parent.manifest.thresholds[parent.manifest.default_score].value
        table[0] = (table[0][0], f"{float((old_gate > old_thr).mean()):.4f}", table[0][2])
    if len(anomalies):
        new_anom = _scores(new, anomalies)
        assert new_anom is not None
        new_auc = calibrate.roc_auc(new_gate, new_anom)
        row = ["ROC-AUC (held-out normals vs labelled anomalies)", "-", f"{new_auc:.4f}"]
        old_anom = _scores(parent, anomalies) if parent else None
        if parent is not None and old_gate is not None and old_anom is not None:
            old_auc = calibrate.roc_auc(old_gate, old_anom)
            row[1] = f"{old_auc:.4f}"
            checks.append(
                Check(
                    "ROC-AUC not worse than the serving model's",
                    new_auc >= old_auc - auc_margin,
                    f"{new_auc:.4f} vs {old_auc:.4f} (margin {auc_margin:g})",
                )
            )
        table.append((row[0], row[1], row[2]))
        table.append(
            (
                "recall at threshold (labelled anomalies)",
                "-",
                f"{float((new_anom > new_thr).mean()):.4f}",
            )
        )
    table.append(
        (
            "training records",
            str(parent.manifest.data.train_rows) if parent else "-",
            str(m.data.train_rows),
        )
    )
    passed = all(c.passed for c in checks)
    promoted = False
    if passed or force or parent is None:
        registry.promote(version)
        promoted = True
    return Retrained(
        result=result,
        version=version,
        parent=serving,
        promoted=promoted,
        passed=passed,
        checks=checks,
        table=table,
    )
