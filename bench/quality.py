"""Detection quality on the ADBench "Classical" datasets, beside scikit-learn's IsolationForest.

Protocol (../shared/data/README.md): for each seed, shuffle; train on 60% of the normal rows;
test on the other 40% plus all anomalies. Our model sees only its 60% (it splits them itself
into train / validation / calibration); IsolationForest is fitted on the same 60%.
Reports ROC-AUC, average precision and the false-positive rate observed on the test normals at
the threshold calibrated for the target (1%), for every score type.

    python bench/quality.py [--data ../shared/data/adbench] [--seeds 3] [--only NAME ...]
                            [--out bench/results/quality.md] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score

from service.features import encode_columns
from service.runtime import open_bundle
from training.config import TrainConfig
from training.train import train_bundle

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "adbench"
SCORES = ("elbo", "recon", "iwae")


def run_one(
    X: np.ndarray, y: np.ndarray, seed: int, cfg_extra: dict[str, object], workdir: Path
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(y == 0))
    n_train = round(0.6 * len(normal))
    train_idx, test_norm = normal[:n_train], normal[n_train:]
    test_idx = np.concatenate([test_norm, np.flatnonzero(y == 1)])
    cols = [f"f{i}" for i in range(X.shape[1])]
    train_df = pd.DataFrame(X[train_idx], columns=cols)
    test_df = pd.DataFrame(X[test_idx], columns=cols)
    y_test = y[test_idx]

    cfg = TrainConfig(seed=seed, **cfg_extra)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    r = train_bundle(
        train_df,
        workdir / f"b{seed}",
        cfg,
        source="bench",
        data_fingerprint="-",
        progress=False,
        overwrite=True,
    )
    fit_s = time.perf_counter() - t0
    bundle, model = open_bundle(r.path)
    feats = bundle.manifest.features
    enc = encode_columns(feats, {f.name: test_df[f.name].to_numpy() for f in feats})
    out = model.run(enc.inputs)
    res: dict[str, float] = {"fit_s": fit_s, "epochs": r.manifest.metrics["epochs_run"]}
    for st in SCORES:
        s = out[st].astype(np.float64)
        res[f"{st}_auc"] = roc_auc_score(y_test, s)
        res[f"{st}_ap"] = average_precision_score(y_test, s)
        thr = bundle.manifest.thresholds[st].value
        res[f"{st}_fpr"] = float((s[y_test == 0] > thr).mean())

    t0 = time.perf_counter()
    iso_rng = np.random.default_rng(seed + 7)
    hold = iso_rng.random(len(train_idx)) < 0.2
    iso = IsolationForest(random_state=seed).fit(X[train_idx][~hold])
    iso_thr = np.quantile(-iso.score_samples(X[train_idx][hold]), 0.99)
    s = -iso.score_samples(X[test_idx])
    res["iforest_fit_s"] = time.perf_counter() - t0
    res["iforest_auc"] = roc_auc_score(y_test, s)
    res["iforest_ap"] = average_precision_score(y_test, s)
    res["iforest_fpr"] = float((s[y_test == 0] > iso_thr).mean())
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", nargs="+", help="dataset names (e.g. 6_cardio)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "quality.md")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="training config overrides (JSON values), e.g. latent=8 epochs=100",
    )
    a = p.parse_args()
    cfg_extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    files = sorted(a.data.glob("*.npz"), key=lambda f: f.name)
    if a.only:
        files = [f for f in files if f.stem in a.only]
    if not files:
        print(f"no datasets in {a.data}", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            d = np.load(f, allow_pickle=False)
            X, y = d["X"].astype(np.float64), d["y"].astype(int)
            runs = [run_one(X, y, seed, cfg_extra, Path(tmp)) for seed in range(a.seeds)]
            mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            rows.append((f.stem, mean))
            print(
                f"{f.stem:18s} "
                + " ".join(
                    f"{st} {mean[f'{st}_auc']:.3f}/{mean[f'{st}_fpr']:.3f}"
                    for st in (*SCORES, "iforest")
                )
                + f"  fit {mean['fit_s']:.1f}s",
                flush=True,
            )
    keys = [f"{st}_{m}" for st in (*SCORES, "iforest") for m in ("auc", "ap", "fpr")]
    header = (
        "| dataset | "
        + " | ".join(keys)
        + " | fit s (ours) | epochs |\n|---|"
        + "---|" * (len(keys) + 2)
    )
    lines = [header]
    for name, m in rows:
        lines.append(
            f"| {name} | "
            + " | ".join(f"{m[k]:.3f}" for k in keys)
            + f" | {m['fit_s']:.1f} | {m['epochs']:.0f} |"
        )
    avg = {k: float(np.mean([m[k] for _, m in rows])) for k in [*keys, "fit_s"]}
    lines.append(
        "| **mean** | "
        + " | ".join(f"**{avg[k]:.3f}**" for k in keys)
        + f" | {sum(m['fit_s'] for _, m in rows):.0f} total | |"
    )
    table = "\n".join(lines)
    print("\n" + table)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        f"# Detection quality\n\nCommand: `python bench/quality.py --seeds {a.seeds}"
        + (f" --set {' '.join(a.set)}" if a.set else "")
        + "`\n\n"
        "Mean over seeds. `*_fpr` = false-positive rate observed on the test normals at the "
        "threshold calibrated for a 1% target.\n\n" + table + "\n",
        encoding="utf-8",
    )
    print(f"\nwritten to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
