"""The bundle's files from a fitted model: export the scoring graph to ONNX and check it
against torch, calibrate each score type's threshold on held-out normal scores, write the
explorer's files, the manifest and the report (into the temporary directory that
``service.bundle.write_bundle_atomic`` renames into place)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime
import torch

from service.bundle import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    SCORE_TYPES,
    Manifest,
    ModelFile,
    ScoreDistribution,
    ScoreType,
    Threshold,
    manifest_json,
    sha256_file,
)
from service.drift import build_reference
from service.runtime import OnnxModel
from training import calibrate, report
from training.config import TrainConfig
from training.data import Prepared
from training.export import OPSET, compare, export_onnx, input_names
from training.latent import for_bundle as latent_files
from training.model import Layout, ScoringGraph

if TYPE_CHECKING:
    from training.train import History  # training.train imports this module

COMPARE_ROWS = 512  # validation rows run by torch and by onnxruntime to check the export


@dataclass
class Fitted:
    """What training made of the prepared records, for the bundle's files."""

    cfg: TrainConfig
    prep: Prepared
    layout: Layout
    graph: ScoringGraph
    hist: History
    threads: int
    hidden: list[int]
    latent: int
    oof: dict[str, np.ndarray] | None  # cross-fitted scores of every normal record, if any
    folds: int  # how many folds made them
    val_inputs: dict[str, np.ndarray]
    calib_inputs: dict[str, np.ndarray]
    anomaly_inputs: dict[str, np.ndarray]


def write_files(tmp: Path, f: Fitted, head: dict[str, Any]) -> tuple[Manifest, list[str]]:
    """Export, check and calibrate the model into ``tmp``; write the manifest and the report.
    Returns the manifest and any warning about the threshold's precision."""
    cfg, prep = f.cfg, f.prep
    model_path = tmp / MODEL_FILE
    export_onnx(f.graph, f.val_inputs, model_path)
    session = OnnxModel(model_path, intra_op_threads=f.threads)
    max_abs, max_rel = compare(
        f.graph, session, {k: v[:COMPARE_ROWS] for k, v in f.val_inputs.items()}
    )
    calib = session.run(f.calib_inputs)
    anom = session.run(f.anomaly_inputs) if f.anomaly_inputs else {}
    thresholds, distributions, metrics = _calibrate_all(f, calib, anom)
    st = cfg.default_score
    explorer, recon = latent_files(
        tmp,
        f.graph.pre,
        f.graph.vae,
        cfg,
        prep,
        (f.calib_inputs, calib[st]),
        (f.anomaly_inputs, anom.get(st)),
    )
    manifest = Manifest(
        **head,
        format_version=FORMAT_VERSION,
        features=prep.features,
        ignored_columns=prep.ignored,
        datetime_columns=prep.datetimes,
        columns=prep.report,
        score_types=list(SCORE_TYPES),
        default_score=st,
        target_fpr=cfg.target_fpr,
        thresholds=thresholds,
        distributions=distributions,
        metrics=metrics,
        config={**cfg.to_dict(), "hidden": f.hidden, "latent": f.latent},
        libraries=LIBRARIES,
        model=ModelFile(
            sha256=sha256_file(model_path),
            inputs=input_names(f.graph),
            outputs=session.output_names,
            opset=OPSET,
            max_abs_diff=max_abs,
            max_rel_diff=max_rel,
        ),
        reference=build_reference(prep.features, f.calib_inputs, calib[st]),
        explorer=explorer,
    )
    (tmp / MANIFEST_FILE).write_text(manifest_json(manifest), encoding="utf-8")
    report.write(tmp, manifest, f.hist, calib, anom, (f.calib_inputs, recon))
    return manifest, _precision_note(thresholds[st], cfg.target_fpr, metrics)


LIBRARIES = {  # what made the bundle, recorded in its manifest
    "python": platform.python_version(),
    "torch": torch.__version__,
    "onnx": onnx.__version__,
    "onnxruntime": onnxruntime.__version__,
    "numpy": np.__version__,
}


def _calibrate_all(
    f: Fitted, calib: dict[str, np.ndarray], anom: dict[str, np.ndarray]
) -> tuple[dict[ScoreType, Threshold], dict[ScoreType, ScoreDistribution], dict[str, Any]]:
    """Each score type's threshold and normal-score distribution, and the training metrics
    (with labelled anomalies: how well each score type separates them)."""
    cfg, hist = f.cfg, f.hist
    normal_scores = f.oof or calib
    thresholds: dict[ScoreType, Threshold] = {}
    distributions: dict[ScoreType, ScoreDistribution] = {}
    metrics: dict[str, Any] = {
        "calibration_scores": len(normal_scores[cfg.default_score]),
        "best_epoch": hist.best_epoch + 1,
        "epochs_run": len(hist.val_loss),
        "validation_loss": hist.val_loss[hist.best_epoch],
        "train_seconds": round(hist.seconds, 3),
        "warm_started_tensors": hist.warm_started_tensors,
        "threads": f.threads,
    }
    for st in SCORE_TYPES:
        value, method, interval = _calibrated(normal_scores[st], cfg.target_fpr, f.folds)
        f1 = None
        if anom:
            f1, f1_best = calibrate.f1_threshold(calib[st], anom[st])
            metrics[f"{st}_roc_auc"] = calibrate.roc_auc(calib[st], anom[st])
            metrics[f"{st}_average_precision"] = calibrate.average_precision(calib[st], anom[st])
            metrics[f"{st}_f1_best"] = f1_best
            metrics[f"{st}_recall_at_threshold"] = float((anom[st] > value).mean())
        thresholds[st] = Threshold(value=value, method=method, f1=f1, fpr_interval=interval)
        probs, quants = calibrate.distribution(normal_scores[st])
        distributions[st] = ScoreDistribution(probs=probs, quantiles=quants)
    return thresholds, distributions, metrics


def _calibrated(
    scores: np.ndarray, fpr: float, folds: int
) -> tuple[float, str, tuple[float, float]]:
    """Threshold, how it was estimated, and a 90% interval of its false-positive rate
    (``folds``: how many folds cross-fitted the scores, 0 if none did)."""
    value, method = calibrate.threshold_for_fpr(scores, fpr)
    if folds:
        method += f" of out-of-fold scores ({folds} folds)"
    return value, method, calibrate.fpr_interval(scores, fpr)


def _precision_note(t: Threshold, fpr: float, metrics: dict[str, Any]) -> list[str]:
    """A warning when the calibration scores pin the alarm rate down no better than 2x."""
    lo, hi = t.fpr_interval or (fpr, fpr)
    if lo >= fpr / 2 and hi <= 2 * fpr:
        return []
    return [
        f"the alarm threshold is imprecise: {metrics['calibration_scores']} calibration scores "
        f"put its false-positive rate between {lo:.2%} and {hi:.2%} (90%) for a {fpr:.2%} "
        "target; more normal records would narrow it"
    ]
