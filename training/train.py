"""Fit a VAE on normal records, calibrate its alarm threshold, export one model bundle.

Read top to bottom: prepare the data, fit, export the scoring graph, score the held-out
calibration slice with onnxruntime (exactly what the service will compute), set thresholds,
write the bundle atomically.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from service.bundle import (
    SCORE_TYPES,
    BooleanFeature,
    CategoricalFeature,
    DataInfo,
    Manifest,
    NumericFeature,
    write_bundle_atomic,
)
from service.cpus import TRAINING_THREADS
from service.features import encode_columns
from service.registry import new_version
from training import calibrate, neighbours
from training.bundle_files import Fitted, write_files
from training.config import TrainConfig
from training.data import Feature, Prepared, prepare
from training.latent import image_of
from training.model import (
    ATTRIBUTION_FLOOR,
    VAE,
    Layout,
    Preprocess,
    ScoringGraph,
    kl_normal,
)

EVAL_BATCH = 4096  # rows per forward pass that learns nothing (validation, attribution)
GRAD_CLIP = 10.0  # most a batch's gradient norm may be: a batch of odd records cannot fling it
# early stopping's validation loss leaves out this share of the worst-scoring records
VAL_TRIM = 0.01
MIN_IMPROVEMENT = 1e-4  # a validation loss lower by less (nats per record) is no better
# Sizes from the d inputs: a first hidden layer of 2d within [64, 512], a second of half that
# (at least 32): wide enough for one-hot categories, small enough to train in minutes on a CPU;
# one latent dimension per 4 features within [2, 32]: a bottleneck, not a copy.
HIDDEN_PER_INPUT, HIDDEN_MIN, HIDDEN_MAX, SECOND_HIDDEN_MIN = 2, 64, 512, 32
FEATURES_PER_LATENT, LATENT_MIN, LATENT_MAX = 4, 2, 32
# the neighbour term's weight is split 3:1 between the input-space and the latent distance (in
# units of the score's median absolute deviation): of the splits measured on the dev sets, the
# input distance without the encoder's clamp carried most (bench/results/quality.md)
INPUT_SHARE, LATENT_SHARE = 1.5, 0.5
# attribution divides by at least the total excess NLL of this share of the training rows
ATTRIBUTION_QUANTILE = 0.9
# offsets from cfg.seed: each random stream (batches, validation noise, the graph's fixed
# posterior samples) has its own, so changing one's length leaves the others as they were
VAL_NOISE_SEED, GRAPH_NOISE_SEED = 1, 2
# cross-fitting's: the folds, each fold's validation split, each fold model's seed (+ fold)
FOLDS_SEED, FOLD_SPLIT_SEED, FOLD_MODEL_SEED = 3, 4, 10


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
    h = int(min(HIDDEN_MAX, max(HIDDEN_MIN, HIDDEN_PER_INPUT * d)))
    hidden = cfg.hidden or [h, max(SECOND_HIDDEN_MIN, h // 2)]
    per_latent = math.ceil(layout.n_features / FEATURES_PER_LATENT)
    latent = cfg.latent or int(min(LATENT_MAX, max(LATENT_MIN, per_latent)))
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
    warm = _warm_start(vae, init_weights) if init_weights else 0
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_val = (val[0] if val[0] is not None else val[1]).shape[0]  # type: ignore[union-attr]
    val_noise = torch.randn(
        n_val, latent, generator=torch.Generator().manual_seed(cfg.seed + VAL_NOISE_SEED)
    )
    hist, best, best_state, stale = History(), math.inf, copy.deepcopy(vae.state_dict()), 0
    hist.warm_started_tensors = warm
    start = time.perf_counter()
    bar = tqdm(
        range(cfg.epochs), desc="training", unit="epoch", disable=not progress, dynamic_ncols=True
    )
    for epoch in bar:
        beta = cfg.beta * min(1.0, (epoch + 1) / max(1, cfg.beta_warmup_epochs))
        train_loss = _train_epoch(pre, vae, opt, (x_num, x_cat), cfg.batch_size, beta, gen)
        vloss = _validation_loss(pre, vae, val, val_noise)
        hist.train_loss.append(train_loss)
        hist.val_loss.append(vloss)
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{vloss:.3f}")
        # the validation loss is always the true negative ELBO (beta = 1); patience starts
        # counting once the KL warm-up is over
        if vloss < best - MIN_IMPROVEMENT:
            best, hist.best_epoch, stale = vloss, epoch, 0
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


def _warm_start(vae: VAE, init_weights: dict[str, torch.Tensor]) -> int:
    """Set every parameter ``init_weights`` has under the same name and shape; how many."""
    own = vae.state_dict()
    usable = {k: v for k, v in init_weights.items() if k in own and own[k].shape == v.shape}
    vae.load_state_dict(usable, strict=False)
    return len(usable)


def _train_epoch(
    pre: Preprocess,
    vae: VAE,
    opt: torch.optim.Optimizer,
    data: tuple[torch.Tensor | None, torch.Tensor | None],
    batch_size: int,
    beta: float,
    gen: torch.Generator,
) -> float:
    """One pass over the shuffled training records; their mean loss (NLL + beta * KL)."""
    x_num, x_cat = data
    n = (x_num if x_num is not None else x_cat).shape[0]  # type: ignore[union-attr]
    vae.train()
    perm = torch.randperm(n, generator=gen)
    total = 0.0
    for sl in _batches(n, batch_size):
        idx = perm[sl]
        xn, xc = _take(x_num, idx), _take(x_cat, idx)
        enc_in, s, miss = pre(xn, xc)
        mu, lv = vae.encode(enc_in)
        z = mu + torch.exp(0.5 * lv) * torch.randn(mu.shape, generator=gen)
        nll = vae.feature_nll(vae.decoder(z), s, miss, xc).sum(1)
        loss = (nll + beta * kl_normal(mu, lv)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), GRAD_CLIP)
        opt.step()
        total += loss.item() * (sl.stop - sl.start)
    vae.eval()
    return total / n


def _validation_loss(
    pre: Preprocess,
    vae: VAE,
    val: tuple[torch.Tensor | None, torch.Tensor | None],
    noise: torch.Tensor,
) -> float:
    """The validation records' negative ELBO, with fixed posterior noise, averaged over all
    but the worst VAL_TRIM of them: one record with a value training never saw can score
    10^4 nats and, in a plain mean, stop training at the first epoch (5_campaign, seed 1)."""
    n_val = noise.shape[0]
    losses = []
    with torch.no_grad():
        for sl in _batches(n_val, EVAL_BATCH):
            xn, xc = _take(val[0], sl), _take(val[1], sl)
            enc_in, s, miss = pre(xn, xc)
            mu, lv = vae.encode(enc_in)
            z = mu + torch.exp(0.5 * lv) * noise[sl]
            nll = vae.feature_nll(vae.decoder(z), s, miss, xc).sum(1)
            losses.append(nll + kl_normal(mu, lv))
    kept = n_val - math.floor(VAL_TRIM * n_val)
    return float(torch.sort(torch.cat(losses)).values[:kept].mean())


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
    noise = torch.Generator().manual_seed(cfg.seed + GRAPH_NOISE_SEED)
    eps = torch.randn(cfg.samples, latent, generator=noise)
    graph = ScoringGraph(pre, vae, eps, torch.zeros(layout.n_features))
    # attribution: each feature's NLL in excess of its median on (a sample of) the training
    # rows, divided by at least the total excess of ATTRIBUTION_QUANTILE of those rows
    with torch.no_grad():
        sample = _rows(normal, train_idx[:EVAL_BATCH])
        nll, *_ = graph.per_sample_nll(*_tensors(sample))
        feature_nll = nll.mean(1)
        graph.baseline.copy_(feature_nll.median(0).values)
        total = torch.relu(feature_nll - graph.baseline).sum(1)
        typical = torch.quantile(total, ATTRIBUTION_QUANTILE)
        graph.floor.copy_(torch.clamp(typical, min=ATTRIBUTION_FLOOR))
    if cfg.neighbour_weight > 0:
        bank = _tensors(_rows(normal, train_idx[: cfg.neighbour_bank]))
        val = _tensors(_rows(normal, val_idx[:EVAL_BATCH]))
        strengths = (
            cfg.neighbour_weight * INPUT_SHARE,
            cfg.neighbour_weight * LATENT_SHARE,
            cfg.tail_weight,
        )
        neighbours.attach(graph, bank, val, strengths)
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
    folds = np.array_split(
        np.random.default_rng(cfg.seed + FOLDS_SEED).permutation(everyone), CROSS_FOLDS
    )
    parts: list[list[np.ndarray]] = [[] for _ in SCORE_TYPES]
    for k, held in enumerate(folds):
        rest = np.setdiff1d(trainable, held)
        rest = np.random.default_rng(cfg.seed + FOLD_SPLIT_SEED + k).permutation(rest)
        n_val = max(1, round(len(rest) * cfg.validation_fraction))
        fold_cfg = cfg.model_copy(update={"seed": cfg.seed + FOLD_MODEL_SEED + k})
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
    if not callable(out):
        out = Path(out)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists (choose another --out, or --overwrite)")
    prep: Prepared = prepare(df, cfg, trainable)
    image_of(cfg, prep)  # a config's image that does not fit the data stops us before training
    f = _fit_all(prep, cfg, progress, init_weights)
    created = datetime.now(UTC)
    version = version or new_version(created)
    head = {
        "name": cfg.name or Path(source).stem or "model",
        "version": version,
        "created_at": created,
        "parent_version": parent_version,
        "data": DataInfo(
            source=Path(source).name,
            fingerprint=data_fingerprint,
            rows=len(df),
            train_rows=len(prep.train_idx),
            validation_rows=len(prep.val_idx),
            calibration_rows=len(prep.calib_idx),
            anomaly_rows=prep.n_anomalies,
        ),
    }
    written: list[tuple[Manifest, list[str]]] = []
    dest = out(version) if callable(out) else out
    path = write_bundle_atomic(
        dest, lambda tmp: written.append(write_files(tmp, f, head)), overwrite=overwrite
    )
    manifest, notes = written[0]
    return Result(path=path, manifest=manifest, history=f.hist, warnings=[*prep.warnings, *notes])


def _fit_all(
    prep: Prepared,
    cfg: TrainConfig,
    progress: bool,
    init_weights: dict[str, torch.Tensor] | None,
) -> Fitted:
    """Fit the exported model (and, when calibration records are too few, the fold models)."""
    layout = layout_of(prep.features)
    normal = encode_columns(prep.features, prep.columns).inputs
    threads = cfg.threads or TRAINING_THREADS
    torch.set_num_threads(threads)
    graph, hist = build_graph(
        layout, normal, prep.train_idx, prep.val_idx, cfg, progress, init_weights
    )
    # too few calibration records to read the threshold off them: score every normal record
    # with models that never saw it (cross-fitting), and calibrate on all of those scores
    oof = (
        out_of_fold_scores(layout, normal, prep, cfg)
        if calibrate.needs_tail(len(prep.calib_idx), cfg.target_fpr)
        else None
    )
    anomaly_inputs = (
        encode_columns(prep.features, prep.anomalies).inputs if prep.n_anomalies else {}
    )
    hidden, latent = model_sizes(layout, cfg)
    return Fitted(
        cfg,
        prep,
        layout,
        graph,
        hist,
        threads,
        hidden,
        latent,
        oof,
        CROSS_FOLDS if oof else 0,
        _rows(normal, prep.val_idx),
        _rows(normal, prep.calib_idx),
        anomaly_inputs,
    )
