"""Compare ways of making one score from the parts bench/score_parts.py saved (ROC-AUC, offline).

python bench/score_fusion.py /tmp/parts [--tag base]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from quality import DEFAULT_DATA, cases, peers  # type: ignore[import-not-found]
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

BANK = 2048
VAL = 4096


def knn(q: np.ndarray, bank: np.ndarray, k: int = 1, mean: bool = False) -> np.ndarray:
    out = []
    bb = (bank * bank).sum(1)
    for i in range(0, len(q), 2048):
        x = q[i : i + 2048].astype(np.float64)
        d2 = bb[None, :] - 2 * x @ bank.T.astype(np.float64) + (x * x).sum(1)[:, None]
        d2 = np.maximum(d2, 0)
        part = np.partition(d2, k - 1, axis=1)[:, :k] if k > 1 else d2.min(1, keepdims=True)
        part = np.sqrt(np.sort(part, 1))
        out.append(part.mean(1) if mean else part[:, -1])
    return np.concatenate(out)


def iqr(x: np.ndarray) -> float:
    return float(np.quantile(x, 0.75) - np.quantile(x, 0.25))


def tails(q: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per feature -log left and right empirical tail probabilities of q against ref."""
    n = len(ref)
    srt = np.sort(ref, 0)
    left = np.empty_like(q, dtype=np.float64)
    right = np.empty_like(q, dtype=np.float64)
    for j in range(q.shape[1]):
        left[:, j] = (np.searchsorted(srt[:, j], q[:, j], side="right") + 1) / (n + 1)
        right[:, j] = (n - np.searchsorted(srt[:, j], q[:, j], side="left") + 1) / (n + 1)
    return -np.log(left), -np.log(right)


def ecod(q: np.ndarray, ref: np.ndarray, kind: str) -> np.ndarray:
    lt, rt = tails(q, ref)
    if kind == "two":  # both tails, the rarer per feature, summed
        return np.maximum(lt, rt).sum(1)
    if kind == "twomax":
        return np.maximum(lt, rt).max(1)
    # ECOD: max of the left sum, the right sum and the skewness-chosen sum
    from scipy.stats import skew

    sk = np.sign(skew(ref, axis=0))
    auto = np.where(sk < 0, lt, rt).sum(1)
    return np.maximum.reduce([lt.sum(1), rt.sum(1), auto])


def load(d: Path, tag: str) -> dict[str, list[dict]]:
    """Per dataset, per seed: the labels and the terms (cached beside the parts)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for f in sorted(d.glob(f"*__{tag}__*.npz")):
        if f.name.endswith("terms.npz"):
            continue
        name = f.name.split("__")[0]
        cache = f.with_suffix(".terms.npz")
        if cache.exists():
            c = dict(np.load(cache))
        else:
            r = dict(np.load(f))
            c = {"y": r["y"], "val_loss": r["val_loss"]}
            for k, (v, x) in terms(r).items():
                c[f"v_{k}"], c[f"t_{k}"] = v, x
            np.savez(cache, **c)
        scache = f.with_suffix(".sterms.npz")
        if not scache.exists():
            np.savez(scache, **s_terms(name, int(f.stem.split("__")[2])))
        c.update(dict(np.load(scache)))
        lcache = f.with_suffix(".lterms.npz")
        if not lcache.exists():
            np.savez(lcache, **local_terms(dict(np.load(f))))
        c.update(dict(np.load(lcache)))
        t = {k[2:]: (c[f"v_{k[2:]}"], c[f"t_{k[2:]}"]) for k in c if k.startswith("v_")}
        out[name].append({"y": c["y"], "t": t, "val_loss": float(c["val_loss"])})
    return out


_CASES: dict = {}
DATA = [DEFAULT_DATA]


def s_terms(name: str, seed: int) -> dict[str, np.ndarray]:
    """Input-space distances on the scaled numerics without the encoder's clamp."""
    import pandas as pd
    import torch

    from service.features import encode_columns
    from training.config import TrainConfig
    from training.data import prepare
    from training.model import Preprocess
    from training.train import _rows, _tensors, layout_of

    if not _CASES:
        _CASES.update({c[0]: c[1:] for c in cases(DATA[0])})
    X, y, cap = _CASES[name]
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(y == 0))
    ntr = round(0.6 * len(normal))
    tr, te = normal[:ntr][:cap], np.concatenate([normal[ntr:], np.flatnonzero(y == 1)])
    cols = [f"f{i}" for i in range(X.shape[1])]
    prep = prepare(pd.DataFrame(X[tr], columns=cols), TrainConfig(seed=seed))
    pre = Preprocess(layout_of(prep.features))
    inp = encode_columns(prep.features, prep.columns).inputs
    tdf = pd.DataFrame(X[te], columns=cols)
    tin = encode_columns(
        prep.features, {f.name: tdf[f.name].to_numpy() for f in prep.features}
    ).inputs

    def sp(d: dict) -> np.ndarray:
        with torch.no_grad():
            return pre(*_tensors(d))[1].numpy()

    bank = sp(_rows(inp, prep.train_idx[:BANK]))
    v, t = sp(_rows(inp, prep.val_idx[:VAL])), sp(tin)
    out = {}
    for k in (1, 3, 5):
        out[f"v_dsin{k}"], out[f"t_dsin{k}"] = knn(v, bank, k), knn(t, bank, k)
    return out


def local(q: np.ndarray, bank: np.ndarray, v: np.ndarray, power: float) -> np.ndarray:
    """training/neighbours.py's LocalDistance: mean distance to the 2 nearest bank rows over
    the power of their own spacing (mean distance to their 2 nearest others), floored at 0.1 of
    the validation records' (``v``) median spacing."""

    def near(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        bb, dist, idx = (bank * bank).sum(1), [], []
        for i in range(0, len(x), 1024):
            xi = x[i : i + 1024].astype(np.float64)
            d2 = bb[None, :] - 2 * xi @ bank.T.astype(np.float64) + (xi * xi).sum(1)[:, None]
            j = np.argpartition(d2, k - 1, axis=1)[:, :k]
            dd = np.maximum(np.take_along_axis(d2, j, 1), 0)
            o = np.argsort(dd, 1)
            idx.append(np.take_along_axis(j, o, 1))
            dist.append(np.sqrt(np.take_along_axis(dd, o, 1)))
        return np.concatenate(dist), np.concatenate(idx)

    spacing = near(bank, 3)[0][:, 1:].mean(1)
    floor = 0.1 * float(np.median(spacing[near(v, 2)[1]].mean(1)))
    d, i = near(q, 2)
    return d.mean(1) / (spacing[i].mean(1) + max(floor, 1e-6)) ** power


def local_terms(r: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Local distances (input space, latent means) at two bank sizes, and the plain mean of
    the 2 nearest (power 0): ``v_loc_in8192``, ``t_loc_mu2048``, ``v_loc0_in8192`` ..."""
    out = {}
    for n in (2048, 8192):
        for space in ("enc", "mu"):
            bank, key = r[f"train_{space}"][:n], "in" if space == "enc" else "mu"
            v, t = r[f"val_{space}"][:VAL], r[f"test_{space}"]
            for p, name in ((0.25, "loc"), (0.0, "loc0")):
                out[f"v_{name}_{key}{n}"] = local(v, bank, v, p)
                out[f"t_{name}_{key}{n}"] = local(t, bank, v, p)
    return out


def terms(r: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each candidate term on (validation, test) records."""
    nn_ = int(r["n_num"])
    t: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    t["elbo"] = (r["val_elbo"][:VAL], r["test_elbo"])
    bank_in, bank_mu = r["train_enc"][:BANK], r["train_mu"][:BANK]
    vi, ti = r["val_enc"][:VAL], r["test_enc"]
    vm, tm = r["val_mu"][:VAL], r["test_mu"]
    for k in (1, 5):
        t[f"din{k}"] = (knn(vi, bank_in, k), knn(ti, bank_in, k))
        t[f"dmu{k}"] = (knn(vm, bank_mu, k), knn(tm, bank_mu, k))
    t["din5m"] = (knn(vi, bank_in, 5, True), knn(ti, bank_in, 5, True))
    full = r["train_enc"][:16384]
    t["din1full"] = (knn(vi, full, 1), knn(ti, full, 1))
    t["din5full"] = (knn(vi, full, 5), knn(ti, full, 5))
    t["dmu1full"] = (knn(vm, r["train_mu"][:16384], 1), knn(tm, r["train_mu"][:16384], 1))
    ref = r["train_enc"][:BANK, :nn_]
    for kind in ("two", "ecod", "twomax"):
        t[f"tail_{kind}"] = (ecod(vi[:, :nn_], ref, kind), ecod(ti[:, :nn_], ref, kind))
    return t


def fuse(t, spec: list[tuple[str, float]], how: str) -> np.ndarray:
    """Sum of w * standardised term (standardised on the validation records)."""
    if how in ("pmax", "zmax"):
        zs = [w * fuse(t, [(name, 1.0)], "rank" if how == "pmax" else "mad") for name, w in spec]
        return np.max(zs, axis=0)
    total = 0.0
    for term, w in spec:
        # "name~": the weight times the term's rank correlation with elbo on the validation
        # records, none if negative (training/neighbours.py's tail term since round six)
        name = term.rstrip("~")
        v, x = t[name]
        if term.endswith("~"):
            w = w * max(float(spearmanr(t["elbo"][0], v).correlation), 0.0)
        if how == "iqr":  # in elbo's units as now: ratio of IQRs (no centering matters for AUC)
            z = (x - np.median(v)) / max(iqr(v), 1e-12)
        elif how == "std":
            z = (x - v.mean()) / max(v.std(), 1e-12)
        elif how.startswith("madf"):  # MAD, at least a share of the mean absolute deviation
            dev = np.abs(v - np.median(v))
            z = x / max(float(np.median(dev)), float(how[4:]) * float(dev.mean()), 1e-12)
        elif how == "mad":
            z = (x - np.median(v)) / max(float(np.median(np.abs(v - np.median(v)))), 1e-12)
        elif how == "rank":  # -log tail prob among validation records
            srt = np.sort(v)
            p = (len(v) - np.searchsorted(srt, x, side="left") + 1) / (len(v) + 1)
            z = -np.log(p)
        total = total + w * z
    return total  # type: ignore[return-value]


VARIANTS: dict[str, tuple[list[tuple[str, float]], str]] = {
    "elbo": ([("elbo", 1)], "iqr"),
    "current": ([("elbo", 1), ("din1", 1), ("dmu1", 1)], "iqr"),
    "din1": ([("din1", 1)], "iqr"),
    "din5": ([("din5", 1)], "iqr"),
    "din1full": ([("din1full", 1)], "iqr"),
    "din5full": ([("din5full", 1)], "iqr"),
    "tail_two": ([("tail_two", 1)], "iqr"),
    "tail_ecod": ([("tail_ecod", 1)], "iqr"),
    "cur+two.5": ([("elbo", 1), ("din1", 1), ("dmu1", 1), ("tail_two", 0.5)], "iqr"),
    "cur+two1": ([("elbo", 1), ("din1", 1), ("dmu1", 1), ("tail_two", 1)], "iqr"),
    "cur+ecod1": ([("elbo", 1), ("din1", 1), ("dmu1", 1), ("tail_ecod", 1)], "iqr"),
    "cur+tmax1": ([("elbo", 1), ("din1", 1), ("dmu1", 1), ("tail_twomax", 1)], "iqr"),
    "cur_k5": ([("elbo", 1), ("din5", 1), ("dmu5", 1)], "iqr"),
    "cur_k5m": ([("elbo", 1), ("din5m", 1), ("dmu5", 1)], "iqr"),
    "cur_full": ([("elbo", 1), ("din1full", 1), ("dmu1full", 1)], "iqr"),
    "cur_std": ([("elbo", 1), ("din1", 1), ("dmu1", 1)], "std"),
    "cur_rank": ([("elbo", 1), ("din1", 1), ("dmu1", 1)], "rank"),
    "e2+din+dmu": ([("elbo", 2), ("din1", 1), ("dmu1", 1)], "iqr"),
    "rank+two": ([("elbo", 1), ("din1", 1), ("dmu1", 1), ("tail_two", 1)], "rank"),
    "std+two": ([("elbo", 1), ("din1", 1), ("dmu1", 1), ("tail_two", 1)], "std"),
    # round three's kept terms, then round four's local distances (training/neighbours.py)
    "r3": ([("elbo", 1), ("dsin1", 3), ("dmu1", 1), ("tail_two", 0.5)], "madf0.5"),
    "mean2_2048": (
        [("elbo", 1), ("loc0_in2048", 3), ("loc0_mu2048", 1), ("tail_two", 0.5)],
        "madf0.5",
    ),
    "mean2_8192": (
        [("elbo", 1), ("loc0_in8192", 3), ("loc0_mu8192", 1), ("tail_two", 0.5)],
        "madf0.5",
    ),
    # round six: the tail term weighed by its agreement with elbo (weight 2 at full agreement)
    "mean2_8192_agree": (
        [("elbo", 1), ("loc0_in8192", 3), ("loc0_mu8192", 1), ("tail_two~", 2)],
        "madf0.5",
    ),
    "local_2048": (
        [("elbo", 1), ("loc_in2048", 3), ("loc_mu2048", 1), ("tail_two", 0.5)],
        "madf0.5",
    ),
    "local_8192": (
        [("elbo", 1), ("loc_in8192", 3), ("loc_mu8192", 1), ("tail_two", 0.5)],
        "madf0.5",
    ),
}


BEST_PEER: dict[str, float] = {}  # per dev set, from the data's README (bench.quality.peers)


def grid(
    data: dict[str, list[dict]], terms_: list[str], weights: list[float], hows: list[str]
) -> None:
    """Every weight combination of ``terms_`` (elbo's weight 1): mean ROC-AUC and worst gap."""
    import itertools

    dev = [d for d in sorted(data) if d in BEST_PEER]
    rows = []
    for how in hows:
        for ws in itertools.product(weights, repeat=len(terms_)):
            spec = [("elbo", 1.0), *((t, w) for t, w in zip(terms_, ws, strict=True) if w)]
            per = {
                d: np.mean([roc_auc_score(r["y"], fuse(r["t"], spec, how)) for r in data[d]])
                for d in dev
            }
            gaps = {d: per[d] - BEST_PEER[d] for d in dev}
            worst = min(gaps, key=gaps.get)
            rows.append((float(np.mean(list(per.values()))), how, ws, gaps[worst], worst, per))
    rows.sort(key=lambda r: -r[0])
    print("mean | how | " + " ".join(terms_) + " | worst gap | " + " ".join(d[:6] for d in dev))
    for m, how, ws, g, wd, per in rows[:25]:
        print(
            f"{m:.4f} | {how} | {ws} | {g:+.3f} {wd[:8]} | "
            + " ".join(f"{per[d]:.3f}" for d in dev)
        )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir", type=Path)
    p.add_argument("--tag", default="base")
    p.add_argument("--variants", nargs="+")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--grid", nargs="+", help="terms to weigh beside elbo")
    p.add_argument("--weights", type=float, nargs="+", default=[0, 0.5, 1, 2])
    p.add_argument("--hows", nargs="+", default=["iqr"])
    a = p.parse_args()
    DATA[0] = a.data
    BEST_PEER.update({n: max(v.values()) for n, v in peers(a.data).items()})
    data = load(a.dir, a.tag)
    if a.grid:
        grid(data, a.grid, a.weights, a.hows)
        return 0
    names = list(a.variants or VARIANTS)
    table: dict[str, dict[str, float]] = {}
    for ds, runs in sorted(data.items()):
        aucs = defaultdict(list)
        for r in runs:
            t = r["t"]
            for v in names:
                spec, how = VARIANTS[v]
                aucs[v].append(roc_auc_score(r["y"], fuse(t, spec, how)))
        table[ds] = {v: float(np.mean(x)) for v, x in aucs.items()}
        table[ds]["n"] = len(runs)
        print(ds, len(runs), " ".join(f"{v}={table[ds][v]:.3f}" for v in names), flush=True)
    dev = [d for d in table if not d.startswith("digits") and not d.endswith("_300")]
    print("\n| variant | " + " | ".join(d.split("_", 1)[1][:8] for d in dev) + " | mean |")
    for v in names:
        vals = [table[d][v] for d in dev]
        print(f"| {v} | " + " | ".join(f"{x:.3f}" for x in vals) + f" | {np.mean(vals):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
