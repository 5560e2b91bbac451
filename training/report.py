"""The training report: PNG plots and a small HTML page beside them in the bundle."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from service.bundle import Manifest
from training import calibrate

if TYPE_CHECKING:
    from training.train import History


def write(
    folder: Path,
    m: Manifest,
    hist: History,
    calib: dict[str, np.ndarray],
    anomalies: dict[str, np.ndarray],
    recon: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
) -> None:
    """Write loss.png, scores.png, roc.png (when labels were given) and report.html."""
    images = ["loss.png", "scores.png"]
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = np.arange(1, len(hist.train_loss) + 1)
    ax.plot(epochs, hist.train_loss, label="train (beta-weighted)")
    ax.plot(epochs, hist.val_loss, label="validation (negative ELBO)")
    ax.axvline(hist.best_epoch + 1, color="grey", ls="--", lw=1, label="kept epoch")
    ax.set(xlabel="epoch", ylabel="loss per record", title="Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)
    plt.close(fig)

    st = m.default_score
    thr = m.thresholds[st].value
    fig, ax = plt.subplots(figsize=(7, 4))
    both = np.concatenate([calib[st], anomalies.get(st, np.array([]))])
    lo, hi = np.percentile(both, [0.5, 99.5])
    bins = np.linspace(lo, max(hi, thr * 1.05 if thr > 0 else thr + 1), 60)
    ax.hist(
        np.clip(calib[st], bins[0], bins[-1]),
        bins=list(bins),
        alpha=0.7,
        density=True,
        label="normal (calibration)",
    )
    if st in anomalies:
        ax.hist(
            np.clip(anomalies[st], bins[0], bins[-1]),
            bins=list(bins),
            alpha=0.6,
            density=True,
            label="labelled anomalies",
        )
    ax.axvline(thr, color="red", lw=1.5, label=f"threshold {thr:.3g} (target FPR {m.target_fpr})")
    ax.set(
        xlabel=f"score ({st}, higher = more anomalous)",
        ylabel="density",
        title="Scores on held-out data",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "scores.png", dpi=100)
    plt.close(fig)

    if anomalies:
        images.append("roc.png")
        fig, ax = plt.subplots(figsize=(5, 5))
        for s in m.score_types:
            fpr, tpr = calibrate.roc_curve(calib[s], anomalies[s])
            ax.plot(fpr, tpr, label=f"{s} (AUC {m.metrics[f'{s}_roc_auc']:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", ls=":")
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "roc.png", dpi=100)
        plt.close(fig)

    rows = [
        ("name", m.name),
        ("version", m.version),
        ("created", m.created_at.isoformat()),
        (
            "records (train / validation / calibration / anomalies)",
            f"{m.data.train_rows} / {m.data.validation_rows} / {m.data.calibration_rows} / "
            f"{m.data.anomaly_rows}",
        ),
        ("features", ", ".join(f"{f.name} ({f.kind})" for f in m.features)),
        ("default score", st),
        *(
            (f"threshold {s}", f"{m.thresholds[s].value:.6g} ({m.thresholds[s].method})")
            for s in m.score_types
        ),
        *((k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in m.metrics.items()),
    ]
    table = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    imgs = "\n".join(f'<p><img src="{i}" alt="{i}"></p>' for i in images)
    (folder / "report.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(m.name)} training report"
        f"</title><h1>{html.escape(m.name)} {html.escape(m.version)}</h1>"
        f"<table>{table}</table>{column_table(m)}{imgs}\n",
        encoding="utf-8",
    )


def column_table(m: Manifest) -> str:
    """Every column of the training data: used or left out, its type, how, why."""
    head = "".join(f"<th>{h}</th>" for h in ("column", "used", "type", "transform", "reason"))
    rows = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(v)}</td>"
            for v in (c.name, "yes" if c.used else "no", c.type, c.transform, c.reason)
        )
        + "</tr>"
        for c in m.columns
    )
    return f"<h2>Columns</h2><table id='columns'><tr>{head}</tr>\n{rows}</table>"
