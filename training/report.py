"""The training report: PNG plots and a small HTML page beside them in the bundle."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from service.bundle import BooleanFeature, Manifest, NumericFeature
from service.latent import feature_slots
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
    loss_plot(folder / "loss.png", hist, int(m.config.get("beta_warmup_epochs", 0)))
    if m.explorer is not None:
        images.append("latent.png")
        latent_plot(folder / "latent.png", m)
    scores_plot(folder / "scores.png", m, calib, anomalies)
    if anomalies:
        images.append("roc.png")
        roc_plot(folder / "roc.png", m, calib, anomalies)
    table = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in summary_rows(m)
    )
    imgs = "\n".join(f'<p><img src="{i}" alt="{i}"></p>' for i in images)
    (folder / "report.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(m.name)} training report"
        f"</title><h1>{html.escape(m.name)} {html.escape(m.version)}</h1>"
        f"<table>{table}</table>{imgs}{feature_table(m, recon)}{dropped_table(m)}"
        f"{column_table(m)}\n",
        encoding="utf-8",
    )


def scores_plot(
    path: Path, m: Manifest, calib: dict[str, np.ndarray], anomalies: dict[str, np.ndarray]
) -> None:
    """Histogram of the default score on held-out normal records (and labelled anomalies),
    with the threshold."""
    st = m.default_score
    thr = m.thresholds[st].value
    fig, ax = plt.subplots(figsize=(7, 4))
    both = np.concatenate([calib[st], anomalies.get(st, np.array([]))])
    lo, hi = np.percentile(both, [0.5, 99.5])
    bins = np.linspace(lo, max(hi, thr * 1.05 if thr > 0 else thr + 1), 60)
    shown = [(calib[st], 0.7, "normal (calibration)")]
    if st in anomalies:
        shown.append((anomalies[st], 0.6, "labelled anomalies"))
    for scores, alpha, label in shown:
        clipped = np.clip(scores, bins[0], bins[-1])
        ax.hist(clipped, bins=list(bins), alpha=alpha, density=True, label=label)
    ax.axvline(thr, color="red", lw=1.5, label=f"threshold {thr:.3g} (target FPR {m.target_fpr})")
    ax.set(
        xlabel=f"score ({st}, higher = more anomalous)",
        ylabel="density",
        title="Scores on held-out data",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def roc_plot(
    path: Path, m: Manifest, calib: dict[str, np.ndarray], anomalies: dict[str, np.ndarray]
) -> None:
    """ROC curve of every score type against the labelled anomalies."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for s in m.score_types:
        fpr, tpr = calibrate.roc_curve(calib[s], anomalies[s])
        ax.plot(fpr, tpr, label=f"{s} (AUC {m.metrics[f'{s}_roc_auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_rows(m: Manifest) -> list[tuple[str, str]]:
    """(label, value) rows of the report's summary table: the bundle, data, thresholds, metrics."""
    return [
        ("name", m.name),
        ("version", m.version),
        ("created", m.created_at.isoformat()),
        (
            "records (train / validation / calibration / anomalies)",
            f"{m.data.train_rows} / {m.data.validation_rows} / {m.data.calibration_rows} / "
            f"{m.data.anomaly_rows}",
        ),
        ("features", ", ".join(f"{f.name} ({f.kind})" for f in m.features)),
        ("default score", m.default_score),
        *(
            (f"threshold {s}", f"{m.thresholds[s].value:.6g} ({m.thresholds[s].method})")
            for s in m.score_types
        ),
        *((k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in m.metrics.items()),
    ]


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


def loss_plot(path: Path, hist: History, warmup: int) -> None:
    """Both losses per epoch, saying what each is and why the training loss first rises."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    epochs = np.arange(1, len(hist.train_loss) + 1)
    ax.plot(epochs, hist.train_loss, label="training: reconstruction NLL + β·KL (β warming up)")
    ax.plot(epochs, hist.val_loss, label="validation: negative ELBO (β = 1)")
    ax.axvline(
        hist.best_epoch + 1, color="grey", ls="--", lw=1, label="kept epoch (best validation)"
    )
    if warmup > 1:
        ax.axvspan(1, min(warmup, len(epochs)), color="orange", alpha=0.12)
        ax.text(
            1.2, 0.97, f"epochs 1-{warmup}: the KL weight β grows from 0 to 1, so the\n"
            "training loss counts ever more KL and may rise meanwhile",
            transform=ax.get_xaxis_transform(), va="top",
            fontsize=8,
        )  # fmt: skip
    ax.set(
        xlabel="epoch",
        ylabel="loss per record (nats, lower is better)",
        title="Training and validation loss",
    )
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latent_plot(path: Path, m: Manifest) -> None:
    """The explorer's map of held-out records, by label or by score percentile."""
    e = m.explorer
    assert e is not None
    s = e.sample
    fig, ax = plt.subplots(figsize=(6, 5.5))
    if s.label is not None:
        for lab in sorted(set(s.label)):
            idx = [i for i, v in enumerate(s.label) if v == lab]
            ax.scatter([s.x[i] for i in idx], [s.y[i] for i in idx], s=6, label=lab)
        ax.legend(title=s.label_name, fontsize=7, markerscale=2)
    else:
        sc = ax.scatter(s.x, s.y, c=s.percentile, s=6, cmap="coolwarm", vmin=0, vmax=100)
        fig.colorbar(sc, ax=ax, label="score percentile among normal records")
    axes = ("latent axis 1", "latent axis 2") if e.map.kind == "identity" else (
        f"principal axis 1 ({e.map.explained[0]:.0%} of the variance)",
        f"principal axis 2 ({e.map.explained[1]:.0%})",
    )  # fmt: skip
    ax.set(xlabel=axes[0], ylabel=axes[1], xlim=e.bounds[0], ylim=e.bounds[1])
    ax.set_title(f"Latent map: posterior means of {len(s.x)} held-out records")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def feature_table(
    m: Manifest, recon: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None
) -> str:
    """Each feature: its type and transform, and how well the decoder, at each calibration
    record's posterior mean, reconstructs it."""
    if recon is None or m.explorer is None:
        return ""
    inputs, out = recon
    rows = []
    transforms = {c.name: c.transform for c in m.columns}
    for f, slot in zip(m.features, feature_slots(m.features), strict=True):
        how = transforms.get(f.name, getattr(f, "transform", ""))
        if isinstance(f, NumericFeature):
            x = inputs["x_num"][:, f.column]
            ok = ~np.isnan(x)
            lo, hi = out["num_lo"][ok, slot.col], out["num_hi"][ok, slot.col]
            inside = float(((lo <= x[ok]) & (x[ok] <= hi)).mean()) if ok.any() else float("nan")
            err = np.median(np.abs(out["num_mean"][ok, slot.col] - x[ok])) if ok.any() else 0
            quality = f"{inside:.0%} inside the decoded 90% range; median error {err:.4g}"
        elif isinstance(f, BooleanFeature):
            x = inputs["x_num"][:, f.column]
            ok = ~np.isnan(x)
            hit = ((out["bool_p"][ok, slot.col] >= 0.5) == (x[ok] > 0.5)).mean()
            quality = f"{hit:.0%} decoded as the right value"
        else:
            k = len(f.categories)
            probs = out["cat_p"][:, slot.col : slot.col + k]
            x = inputs["x_cat"][:, f.column]
            hit = (probs.argmax(1) == x).mean()
            p_own = np.take_along_axis(probs, x[:, None], 1).mean()
            quality = f"{hit:.0%} decoded as the right category; mean P(value) {p_own:.2f}"
        rows.append((f.name, f.kind, how, quality))
    head = "".join(f"<th>{h}</th>" for h in ("feature", "type", "transform", "reconstruction"))
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows
    )
    return (
        "<h2>Features</h2><p>How well each feature is reconstructed on the calibration records "
        "(decoded at each record's posterior mean, as explanations are).</p>"
        f"<table id='features'><tr>{head}</tr>\n{body}</table>"
    )


def dropped_table(m: Manifest) -> str:
    """The columns of the training data the model does not use, and why."""
    left = [c for c in m.columns if not c.used]
    if not left:
        return "<h2>Dropped columns</h2><p>None: the model uses every column.</p>"
    body = "\n".join(
        f"<tr><td>{html.escape(c.name)}</td><td>{html.escape(c.reason)}</td></tr>" for c in left
    )
    return (
        "<h2>Dropped columns</h2><table id='dropped'><tr><th>column</th><th>why</th></tr>\n"
        f"{body}</table>"
    )
