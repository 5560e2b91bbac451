"""What ``train`` and ``retrain`` print when a model is trained: its data, fit, thresholds,
quality on labelled anomalies, and one line per column of the training data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.bundle import Manifest

if TYPE_CHECKING:
    from training.train import Result


def summary(r: Result) -> str:
    m = r.manifest
    kinds = [f.kind for f in m.features]
    lines = [
        f"bundle: {r.path}",
        f"model: {m.name} version {m.version}",
        f"records: {m.data.rows} read; {m.data.train_rows} train, {m.data.validation_rows} "
        f"validation, {m.data.calibration_rows} calibration, {m.data.anomaly_rows} labelled "
        "anomalies",
        f"features: {len(kinds)} ({kinds.count('numeric')} numeric, {kinds.count('boolean')} "
        f"boolean, {kinds.count('categorical')} categorical)",
        f"epochs: kept {m.metrics['best_epoch']} of {m.metrics['epochs_run']} "
        f"({m.metrics['train_seconds']:.1f} s, {m.metrics['threads']} torch thread(s)); "
        f"validation loss {m.metrics['validation_loss']:.4f}",
        f"thresholds for a {m.target_fpr:g} false-positive rate: "
        + ", ".join(f"{s}={m.thresholds[s].value:.4f}" for s in m.score_types)
        + f" (default score: {m.default_score})",
    ]
    interval = m.thresholds[m.default_score].fpr_interval
    if interval:
        lines.append(
            f"false-positive rate at the {m.default_score} threshold: {interval[0]:.2%} to "
            f"{interval[1]:.2%} (90% interval, from {m.metrics['calibration_scores']} scores)"
        )
    if m.data.anomaly_rows:
        lines.append(
            "on labelled anomalies vs calibration normals: "
            + "; ".join(
                f"{s} ROC-AUC {m.metrics[f'{s}_roc_auc']:.3f} "
                f"AP {m.metrics[f'{s}_average_precision']:.3f}"
                for s in m.score_types
            )
        )
    lines.append(f"onnxruntime vs torch: max relative difference {m.model.max_rel_diff:.1e}")
    lines += column_lines(m)
    lines.append(f"report: {r.path / 'report.html'}")
    return "\n".join(lines)


def column_lines(m: Manifest) -> list[str]:
    """One line per column of the training data: used or left out, its type, how, why."""
    if not m.columns:
        return []
    width = max(len(c.name) for c in m.columns)
    used = sum(c.used for c in m.columns)
    lines = [f"columns: {used} of {len(m.columns)} used"]
    for c in m.columns:
        how = "; ".join(x for x in (c.transform, c.reason) if x)
        lines.append(
            f"  {c.name:<{width}}  {c.type:<11}  {'used' if c.used else 'left out':<8}  {how}"
        )
    return lines
