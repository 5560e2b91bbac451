"""Fit a VAE on normal records, calibrate its alarm threshold, export one model bundle.

Read top to bottom: prepare the data, fit, export the scoring graph, score the held-out
calibration slice with onnxruntime (exactly what the service will compute), set thresholds,
write the bundle atomically.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import torch
from tqdm.auto import tqdm

from service.bundle import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    SCORE_TYPES,
    BooleanFeature,
    CategoricalFeature,
    DataInfo,
    Manifest,
    ModelFile,
    NumericFeature,
    ScoreDistribution,
    ScoreType,
    Threshold,
    manifest_json,
    sha256_file,
    write_bundle_atomic,
)
from service.cpus import TRAINING_THREADS
from service.drift import build_reference
from service.features import encode_columns
from service.registry import new_version
from service.runtime import OnnxModel
from training import calibrate, neighbours, report
from training.config import TrainConfig
from training.data import Feature, Prepared, prepare
from training.export import OPSET, compare, export_onnx, input_names
from training.model import VAE, Layout, Preprocess, ScoringGraph, kl_normal

EVAL_BATCH = 4096


def layout_of(features: list[Feature]) -> Layout:
    real = [f for f in features if isinstance(f, NumericFeature)]
    bools = [f for f in features if isinstance(f, BooleanFeature)]
    cats = [f for f in features if isinstance(f, CategoricalFeature)]
    return Layout(
        center=[f.center for f in real],
        scale=[f.scale for f in real],
        log=[f.transform == "log" for f in real],
        bool_rate=[f.rate for f in bools],
        nullable=[f.nullable for f in real + bools],
        cat_sizes=[len(f.categories) for f in cats],
    )


def model_sizes(layout: Layout, cfg: TrainConfig) -> tuple[list[int], int]:
    """Hidden sizes and latent size: the config's, or sized from the number of inputs."""
    d = layout.in_dim
    h = int(min(512, max(64, 2 * d)))
    hidden = cfg.hidden or [h, max(32, h // 2)]
    latent = cfg.latent or int(min(32, max(2, math.ceil(layout.n_features / 4))))
    return hidden, latent


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    warm_started_tensors: int = 0


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _take(t: torch.Tensor | None, idx: torch.Tensor | slice) -> torch.Tensor | None:
    return None if t is None else t[idx]


def fit(
    layout: Layout,
    x_num: torch.Tensor | None,
    x_cat: torch.Tensor | None,
    val: tuple[torch.Tensor | None, torch.Tensor | None],
    cfg: TrainConfig,
    progress: bool = True,
    init_weights: dict[str, torch.Tensor] | None = None,
) -> tuple[Preprocess, VAE, History]:
    """Train by minimizing reconstruction NLL + beta * KL; keep the best validation epoch.

    ``init_weights`` (a warm start) sets every VAE parameter it has under the same name and shape.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    hidden, latent = model_sizes(layout, cfg)
    pre, vae = Preprocess(layout), VAE(layout, hidden, latent, cfg.min_std)
    warm = 0
    if init_weights:
        own = vae.state_dict()
        usable = {k: v for k, v in init_weights.items() if k in own and own[k].shape == v.shape}
        vae.load_state_dict(usable, strict=False)
        warm = len(usable)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = (x_num if x_num is not None else x_cat).shape[0]  # type: ignore[union-attr]
    n_val = (val[0] if val[0] is not None else val[1]).shape[0]  # type: ignore[union-attr]
    val_noise = torch.randn(n_val, latent, generator=torch.Generator().manual_seed(cfg.seed + 1))
    hist, best, best_state, stale = History(), math.inf, copy.deepcopy(vae.state_dict()), 0
    hist.warm_started_tensors = warm
    start = time.perf_counter()
    bar = tqdm(
        range(cfg.epochs), desc="training", unit="epoch", disable=not progress, dynamic_ncols=True
    )
    for epoch in bar:
        beta = cfg.beta * min(1.0, (epoch + 1) / max(1, cfg.beta_warmup_epochs))
        vae.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for sl in _batches(n, cfg.batch_size):
            idx = perm[sl]
            xn, xc = _take(x_num, idx), _take(x_cat, idx)
            enc_in, s, miss = pre(xn, xc)
            mu, lv = vae.encode(enc_in)
            z = mu + torch.exp(0.5 * lv) * torch.randn(mu.shape, generator=gen)
            nll = vae.feature_nll(vae.decoder(z), s, miss, xc).sum(1)
            loss = (nll + beta * kl_normal(mu, lv)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 10.0)
            opt.step()
            total += loss.item() * (sl.stop - sl.start)
        vae.eval()
        with torch.no_grad():
            vloss = 0.0
            for sl in _batches(n_val, EVAL_BATCH):
                xn, xc = _take(val[0], sl), _take(val[1], sl)
                enc_in, s, miss = pre(xn, xc)
                mu, lv = vae.encode(enc_in)
                z = mu + torch.exp(0.5 * lv) * val_noise[sl]
                nll = vae.feature_nll(vae.decoder(z), s, miss, xc).sum(1)
                vloss += float((nll + kl_normal(mu, lv)).sum())
        hist.train_loss.append(total / n)
        hist.val_loss.append(vloss / n_val)
        bar.set_postfix(train=f"{total / n:.3f}", val=f"{vloss / n_val:.3f}")
        # the validation loss is always the true negative ELBO (beta = 1); patience starts
        # counting once the KL warm-up is over
        if vloss / n_val < best - 1e-4:
            best, hist.best_epoch, stale = vloss / n_val, epoch, 0
            best_state = copy.deepcopy(vae.state_dict())
        elif epoch >= cfg.beta_warmup_epochs:
            stale += 1
            if stale >= cfg.patience:
                break
    bar.close()
    vae.load_state_dict(best_state)
    vae.eval()
    hist.seconds = time.perf_counter() - start
    return pre, vae, hist


def build_graph(
    layout: Layout,
    normal: dict[str, np.ndarray],
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: TrainConfig,
    progress: bool = False,
    init_weights: dict[str, torch.Tensor] | None = None,
) -> tuple[ScoringGraph, History]:
    """Fit on the ``train_idx`` records and assemble the whole scoring graph."""
    val = _tensors(_rows(normal, val_idx))
    train = _tensors(_rows(normal, train_idx))
    pre, vae, hist = fit(layout, *train, val, cfg, progress, init_weights)
    _, latent = model_sizes(layout, cfg)
    eps = torch.randn(cfg.samples, latent, generator=torch.Generator().manual_seed(cfg.seed + 2))
    graph = ScoringGraph(pre, vae, eps, torch.zeros(layout.n_features))
    # attribution: each feature's NLL in excess of its median on (a sample of) the training
    # rows, divided by at least the total excess of 90% of those rows
    with torch.no_grad():
        sample = _rows(normal, train_idx[:EVAL_BATCH])
        nll, *_ = graph.per_sample_nll(*_tensors(sample))
        feature_nll = nll.mean(1)
        graph.baseline.copy_(feature_nll.median(0).values)
        total = torch.relu(feature_nll - graph.baseline).sum(1)
        graph.floor.copy_(torch.clamp(torch.quantile(total, 0.9), min=0.01))
    if cfg.neighbour_weight > 0:
        bank = _tensors(_rows(normal, train_idx[: cfg.neighbour_bank]))
        val = _tensors(_rows(normal, val_idx[:EVAL_BATCH]))
        neighbours.attach(graph, bank, val, cfg.neighbour_weight)
    graph.eval()
    return graph, hist


CROSS_FOLDS = 5  # each fold model trains on 72% of the records, the exported one on 70%


def out_of_fold_scores(
    layout: Layout, normal: dict[str, np.ndarray], prep: Prepared, cfg: TrainConfig
) -> dict[str, np.ndarray]:
    """Every score of every normal record, each from a model fitted (like the exported one)
    on the other folds only: calibration scores for all the normal records instead of a slice."""
    trainable = np.concatenate([prep.train_idx, prep.val_idx])
    everyone = np.concatenate([trainable, prep.calib_idx])
    folds = np.array_split(np.random.default_rng(cfg.seed + 3).permutation(everyone), CROSS_FOLDS)
    parts: list[list[np.ndarray]] = [[] for _ in SCORE_TYPES]
    for k, held in enumerate(folds):
        rest = np.setdiff1d(trainable, held)
        rest = np.random.default_rng(cfg.seed + 4 + k).permutation(rest)
        n_val = max(1, round(len(rest) * cfg.validation_fraction))
        fold_cfg = dataclasses.replace(cfg, seed=cfg.seed + 10 + k)
        graph, _ = build_graph(layout, normal, rest[n_val:], rest[:n_val], fold_cfg)
        with torch.no_grad():
            out = graph(*(t for t in _tensors(_rows(normal, held)) if t is not None))
        for i in range(len(SCORE_TYPES)):
            parts[i].append(out[i].numpy().astype(np.float64))
    return {st: np.concatenate(parts[i]) for i, st in enumerate(SCORE_TYPES)}


def _tensors(inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    xn, xc = inputs.get("x_num"), inputs.get("x_cat")
    return (
        None if xn is None else torch.from_numpy(xn),
        None if xc is None else torch.from_numpy(xc),
    )


def _rows(inputs: dict[str, np.ndarray], idx: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}


@dataclass
class Result:
    path: Path
    manifest: Manifest
    history: History
    warnings: list[str]


def train_bundle(
    df: pd.DataFrame,
    out: str | Path | Callable[[str], Path],
    cfg: TrainConfig,
    *,
    source: str,
    data_fingerprint: str,
    overwrite: bool = False,
    progress: bool = True,
    parent_version: str | None = None,
    version: str | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    trainable: np.ndarray | None = None,
) -> Result:
    """Train on the records of ``df`` and write a bundle at ``out``. Nothing is written on error.

    ``out`` may be a function of the version (a registry's ``version_path``): the version and
    created-at time are then stamped when training is over, so versions sort in the order
    their bundles were made. ``trainable``: see :func:`training.data.prepare`.
    """
    cfg.validate()
    if not callable(out):
        out = Path(out)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists (choose another --out, or --overwrite)")
    prep: Prepared = prepare(df, cfg, trainable)
    layout = layout_of(prep.features)
    normal = encode_columns(prep.features, prep.columns).inputs
    threads = cfg.threads or TRAINING_THREADS
    torch.set_num_threads(threads)
    val_inputs = _rows(normal, prep.val_idx)
    graph, hist = build_graph(
        layout, normal, prep.train_idx, prep.val_idx, cfg, progress, init_weights
    )
    _, latent = model_sizes(layout, cfg)
    # too few calibration records to read the threshold off them: score every normal record
    # with models that never saw it (cross-fitting), and calibrate on all of those scores
    oof = (
        out_of_fold_scores(layout, normal, prep, cfg)
        if calibrate.needs_tail(len(prep.calib_idx), cfg.target_fpr)
        else None
    )

    calib_inputs = _rows(normal, prep.calib_idx)
    anomaly_inputs = (
        encode_columns(prep.features, prep.anomalies).inputs if prep.n_anomalies else {}
    )
    name = cfg.name or Path(source).stem or "model"
    created = datetime.now(UTC)
    version = version or new_version(created)
    dest = out(version) if callable(out) else out

    def fill(tmp: Path) -> None:
        model_path = tmp / MODEL_FILE
        export_onnx(graph, val_inputs, model_path)
        session = OnnxModel(model_path, intra_op_threads=threads)
        max_abs, max_rel = compare(graph, session, _rows(val_inputs, slice(0, 512)))
        calib = session.run(calib_inputs)
        anom = session.run(anomaly_inputs) if anomaly_inputs else {}
        normal_scores = oof or calib
        thresholds: dict[ScoreType, Threshold] = {}
        distributions: dict[ScoreType, ScoreDistribution] = {}
        metrics: dict[str, Any] = {
            "calibration_scores": len(normal_scores[cfg.default_score]),
            "best_epoch": hist.best_epoch + 1,
            "epochs_run": len(hist.val_loss),
            "validation_loss": hist.val_loss[hist.best_epoch],
            "train_seconds": round(hist.seconds, 3),
            "warm_started_tensors": hist.warm_started_tensors,
            "threads": threads,
        }
        for st in SCORE_TYPES:
            value, method, interval = _calibrated(normal_scores[st], cfg.target_fpr, oof)
            f1 = None
            if anom:
                f1_value, f1_best = calibrate.f1_threshold(calib[st], anom[st])
                f1 = f1_value
                metrics[f"{st}_roc_auc"] = calibrate.roc_auc(calib[st], anom[st])
                metrics[f"{st}_average_precision"] = calibrate.average_precision(
                    calib[st], anom[st]
                )
                metrics[f"{st}_f1_best"] = f1_best
                metrics[f"{st}_recall_at_threshold"] = float((anom[st] > value).mean())
            thresholds[st] = Threshold(value=value, method=method, f1=f1, fpr_interval=interval)
            probs, quants = calibrate.distribution(normal_scores[st])
            distributions[st] = ScoreDistribution(probs=probs, quantiles=quants)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            name=name,
            version=version,
            created_at=created,
            parent_version=parent_version,
            features=prep.features,
            ignored_columns=prep.ignored,
            datetime_columns=prep.datetimes,
            columns=prep.report,
            score_types=list(SCORE_TYPES),
            default_score=cfg.default_score,
            target_fpr=cfg.target_fpr,
            thresholds=thresholds,
            distributions=distributions,
            metrics=metrics,
            config={**cfg.to_dict(), "hidden": model_sizes(layout, cfg)[0], "latent": latent},
            libraries={
                "python": platform.python_version(),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "numpy": np.__version__,
            },
            data=DataInfo(
                source=Path(source).name,
                fingerprint=data_fingerprint,
                rows=len(df),
                train_rows=len(prep.train_idx),
                validation_rows=len(prep.val_idx),
                calibration_rows=len(prep.calib_idx),
                anomaly_rows=prep.n_anomalies,
            ),
            model=ModelFile(
                sha256=sha256_file(model_path),
                inputs=input_names(graph),
                outputs=session.output_names,
                opset=OPSET,
                max_abs_diff=max_abs,
                max_rel_diff=max_rel,
            ),
            reference=build_reference(prep.features, calib_inputs, calib[cfg.default_score]),
        )
        notes.extend(_precision_note(thresholds[cfg.default_score], cfg.target_fpr, metrics))
        (tmp / MANIFEST_FILE).write_text(manifest_json(manifest), encoding="utf-8")
        report.write(tmp, manifest, hist, calib, anom)
        result_manifest.append(manifest)

    result_manifest: list[Manifest] = []
    notes: list[str] = []
    path = write_bundle_atomic(dest, fill, overwrite=overwrite)
    return Result(
        path=path, manifest=result_manifest[0], history=hist, warnings=[*prep.warnings, *notes]
    )


def _calibrated(
    scores: np.ndarray, fpr: float, cross_fitted: dict[str, np.ndarray] | None
) -> tuple[float, str, tuple[float, float]]:
    """Threshold, how it was estimated, and a 90% interval of its false-positive rate."""
    value, method = calibrate.threshold_for_fpr(scores, fpr)
    if cross_fitted:
        method += f" of out-of-fold scores ({CROSS_FOLDS} folds)"
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
