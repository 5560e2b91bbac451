"""How to add a nearest-neighbour distance to the VAE's score: the variants measured before
choosing the one in training/neighbours.py (ROC-AUC, one seed, the bench/quality.py split).

Distances to the nearest of up to 4096 training + validation records: in the encoder's input
space (``in``), between posterior means (``mu``), and between means divided by the posterior
std (``mus``); each alone, and added to the negative ELBO with weight w after both are
standardised (median, IQR) on the calibration records.

    python bench/neighbour_variants.py 6_cardio,12_fault,... [--data ../shared/data/adbench]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from quality import DEFAULT_DATA  # type: ignore[import-not-found]
from sklearn.metrics import roc_auc_score

from service.features import encode_columns
from training.config import TrainConfig
from training.data import prepare
from training.model import ScoringGraph
from training.train import _rows, _tensors, fit, layout_of, model_sizes


def nearest(q: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Distance to the nearest bank row (float64: the expanded square is exact enough)."""
    q, bank = q.astype(np.float64), bank.astype(np.float64)
    out = []
    for i in range(0, len(q), 4096):
        c = q[i : i + 4096]
        d2 = (c**2).sum(1)[:, None] + (bank**2).sum(1)[None] - 2 * c @ bank.T
        out.append(np.sqrt(np.maximum(d2.min(1), 0.0)))
    return np.concatenate(out)


def robust(cal: np.ndarray, x: np.ndarray) -> np.ndarray:
    iqr = np.quantile(cal, 0.75) - np.quantile(cal, 0.25)
    return (x - np.median(cal)) / max(float(iqr), 1e-9)


def run(path: Path, seed: int = 0) -> dict[str, float]:
    d = np.load(path, allow_pickle=False)
    X, y = d["X"].astype(np.float64), d["y"].astype(int)
    normal = np.random.default_rng(seed).permutation(np.flatnonzero(y == 0))
    n_train = round(0.6 * len(normal))
    test = np.concatenate([normal[n_train:], np.flatnonzero(y == 1)])
    cols = [f"f{i}" for i in range(X.shape[1])]
    cfg = TrainConfig(seed=seed, neighbour_weight=0.0)
    prep = prepare(pd.DataFrame(X[normal[:n_train]], columns=cols), cfg)
    layout = layout_of(prep.features)
    enc = encode_columns(prep.features, prep.columns).inputs
    train = _tensors(_rows(enc, prep.train_idx))
    pre, vae, _ = fit(layout, *train, _tensors(_rows(enc, prep.val_idx)), cfg, False)
    gen = torch.Generator().manual_seed(seed + 2)
    eps = torch.randn(cfg.samples, model_sizes(layout, cfg)[1], generator=gen)
    graph = ScoringGraph(pre, vae, eps, torch.zeros(layout.n_features)).eval()
    tdf = pd.DataFrame(X[test], columns=cols)
    tin = encode_columns(prep.features, {f.name: tdf[f.name].to_numpy() for f in prep.features})

    def views(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            elbo, _, _, _, e, mu = graph.model_scores(*_tensors(inputs))
            _, lv = vae.encode(e)
        return {"elbo": elbo.numpy(), "in": e.numpy(), "mu": mu.numpy()} | {
            "mus": (mu / torch.exp(0.5 * lv)).numpy()
        }

    bank_idx = np.concatenate([prep.train_idx, prep.val_idx])
    bank_idx = np.random.default_rng(seed).permutation(bank_idx)[:4096]
    bank, cal, tst = (
        views(_rows(enc, bank_idx)),
        views(_rows(enc, prep.calib_idx)),
        views(tin.inputs),
    )
    y_test = y[test]
    res = {"elbo": roc_auc_score(y_test, tst["elbo"])}
    z = {}
    for v in ("in", "mu", "mus"):
        c, t = nearest(cal[v], bank[v]), nearest(tst[v], bank[v])
        res[f"knn_{v}"] = roc_auc_score(y_test, t)
        z[v] = robust(c, t)
    e = robust(cal["elbo"], tst["elbo"])
    for w in (1, 2, 4):
        for v in z:
            res[f"{v}_w{w}"] = roc_auc_score(y_test, e + w * z[v])
        res[f"in+mu_w{w}"] = roc_auc_score(y_test, e + w * (z["in"] + z["mu"]) / 2)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", help="comma-separated dataset names")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    a = p.parse_args()
    torch.set_num_threads(1)
    out = {}
    for name in a.names.split(","):
        out[name] = run(a.data / f"{name}.npz")
        print(name, " ".join(f"{k}={v:.3f}" for k, v in out[name].items()), flush=True)
    keys = list(next(iter(out.values())))
    print("MEAN", " ".join(f"{k}={np.mean([o[k] for o in out.values()]):.3f}" for k in keys))


if __name__ == "__main__":
    main()
