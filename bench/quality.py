"""Detection quality on the ADBench "Classical" datasets, beside scikit-learn's IsolationForest.

Protocol (../shared/data/README.md): for each seed, shuffle; train on 60% of the normal rows;
test on the other 40% plus all anomalies. Our model sees only its 60% (it splits them itself
into train / validation / calibration); IsolationForest is fitted on the same 60%.
Reports ROC-AUC, average precision and the false-positive rate observed on the test normals at
the threshold calibrated for the target (1%), for every score type, with the PyOD peers'
ROC-AUC (from ../shared/data/README.md) beside ours.

Two calibration cases are added to the ten dev sets, from what needs no download:
``digits_576``: scikit-learn's bundled digits, each 8x8 image upsampled to 24x24 (576 columns,
many constant at the border), digit 0 as the anomalies; ``22_magic.gamma_300``: the same split
of 22_magic.gamma, but the model gets only 300 of the training rows (60 for calibration), so
the observed false-positive rate is measured on thousands of test normals.

    python bench/quality.py [--data ../shared/data/adbench] [--seeds 3] [--only NAME ...]
                            [--out bench/results/quality.md] [--set key=value ...] [--write]

A run of every case writes its tables into --out (between the bench markers); a partial run
(--only) only prints them unless --write says so, so that a quick check of one dataset does not
replace the full table. Runs split over processes: --save-json each, then --render them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.datasets import load_digits
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score

from service.features import encode_columns
from service.runtime import open_bundle
from training.config import TrainConfig
from training.train import train_bundle

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "adbench"
SCORES = ("elbo", "recon", "iwae")
SMALL_ROWS = 300


def wide_digits() -> tuple[np.ndarray, np.ndarray]:
    """Digits as 24x24 images (576 columns, border columns constant); digit 0 = anomaly."""
    d = load_digits()
    imgs = np.stack([np.kron(im, np.ones((3, 3))) for im in d.images])
    return imgs.reshape(len(imgs), -1), (d.target == 0).astype(int)


def cases(data: Path) -> list[tuple[str, np.ndarray, np.ndarray, int | None]]:
    """(name, X, y, cap on training rows): the dev sets, then the two calibration cases."""
    out: list[tuple[str, np.ndarray, np.ndarray, int | None]] = []
    for f in sorted(data.glob("*.npz"), key=lambda f: f.name):
        d = np.load(f, allow_pickle=False)
        out.append((f.stem, d["X"].astype(np.float64), d["y"].astype(int), None))
    magic = [c for c in out if c[0] == "22_magic.gamma"]
    out.append(("digits_576", *wide_digits(), None))
    out += [(f"{n}_{SMALL_ROWS}", X, y, SMALL_ROWS) for n, X, y, _ in magic]
    return out


def peers(data: Path) -> dict[str, dict[str, float]]:
    """PyOD's ROC-AUC per dataset and method, read from the data's README table."""
    readme = data.parent / "README.md"
    if not readme.exists():
        return {}
    rows = [ln.strip("|").split("|") for ln in readme.read_text().splitlines() if "|" in ln]
    head = next((r for r in rows if r[0].strip() == "dataset"), None)
    if head is None:
        return {}
    names = [h.strip() for h in head[1:]]
    table = {}
    for r in rows:
        try:
            table[r[0].strip()] = dict(zip(names, map(float, r[1:]), strict=True))
        except ValueError:
            continue
    return table


def split(
    X: np.ndarray, y: np.ndarray, seed: int, max_train: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """The protocol's split: (training records: 60% of the normal ones, at most ``max_train``;
    test records: the other normal ones and every anomaly; the test labels)."""
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(y == 0))
    n_train = round(0.6 * len(normal))
    train_idx, test_norm = normal[:n_train][:max_train], normal[n_train:]
    test_idx = np.concatenate([test_norm, np.flatnonzero(y == 1)])
    cols = [f"f{i}" for i in range(X.shape[1])]
    return (
        pd.DataFrame(X[train_idx], columns=cols),
        pd.DataFrame(X[test_idx], columns=cols),
        y[test_idx],
    )


def run_one(
    X: np.ndarray,
    y: np.ndarray,
    seed: int,
    cfg_extra: dict[str, object],
    workdir: Path,
    max_train: int | None = None,
) -> dict[str, float]:
    train_df, test_df, y_test = split(X, y, seed, max_train)

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
    res: dict[str, float] = {
        "fit_s": fit_s,
        "epochs": r.manifest.metrics["epochs_run"],
        "calibration_rows": r.manifest.data.calibration_rows,
        # negative ELBO on the validation (normal) records: what a label-free choice can use
        "validation_loss": r.manifest.metrics["validation_loss"],
    }
    for st in SCORES:
        s = out[st].astype(np.float64)
        res[f"{st}_auc"] = roc_auc_score(y_test, s)
        res[f"{st}_ap"] = average_precision_score(y_test, s)
        thr = bundle.manifest.thresholds[st].value
        res[f"{st}_fpr"] = float((s[y_test == 0] > thr).mean())

    t0 = time.perf_counter()
    iso_rng = np.random.default_rng(seed + 7)
    hold = iso_rng.random(len(train_df)) < 0.2
    iso = IsolationForest(random_state=seed).fit(train_df.to_numpy()[~hold])
    iso_thr = np.quantile(-iso.score_samples(train_df.to_numpy()[hold]), 0.99)
    s = -iso.score_samples(test_df.to_numpy())
    res["iforest_fit_s"] = time.perf_counter() - t0
    res["iforest_auc"] = roc_auc_score(y_test, s)
    res["iforest_ap"] = average_precision_score(y_test, s)
    res["iforest_fpr"] = float((s[y_test == 0] > iso_thr).mean())
    return res


def _fmt_row(name: str, m: dict[str, float], keys: list[str], extra: list[str]) -> str:
    return f"| {name} | " + " | ".join([*(f"{m[k]:.3f}" for k in keys), *extra]) + " |"


def dev_table(rows: list[tuple[str, dict[str, float]]], peer: dict[str, dict[str, float]]) -> str:
    keys = [f"{st}_{m}" for st in SCORES for m in ("auc", "fpr")] + ["elbo_ap"]
    keys += ["iforest_auc", "iforest_fpr"]
    head = [*keys, "PyOD KNN", "best peer", "elbo - best", "fit s", "epochs"]
    lines = ["| dataset | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    gaps = []
    for name, m in rows:
        p = peer.get(name, {})
        best = max(p.items(), key=lambda kv: kv[1]) if p else ("-", float("nan"))
        gaps.append(m["elbo_auc"] - best[1])
        extra = [f"{p.get('KNN', float('nan')):.3f}", f"{best[1]:.3f} ({best[0]})"]
        extra += [f"{gaps[-1]:+.3f}", f"{m['fit_s']:.1f}", f"{m['epochs']:.0f}"]
        lines.append(_fmt_row(name, m, keys, extra))
    avg = {k: float(np.mean([m[k] for _, m in rows])) for k in keys}
    oracle = [max(peer[n].values()) for n, _ in rows if n in peer]
    knn = [peer[n]["KNN"] for n, _ in rows if "KNN" in peer.get(n, {})]
    extra = [f"{np.mean(knn):.3f}" if knn else "-", f"{np.mean(oracle):.3f}" if oracle else "-"]
    extra += [f"{np.nanmin(gaps):+.3f} worst", f"{sum(m['fit_s'] for _, m in rows):.0f} total", ""]
    lines.append(_fmt_row("**mean**", avg, keys, extra))
    return "\n".join(lines)


def case_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    keys = [f"{st}_{m}" for st in (*SCORES, "iforest") for m in ("auc", "fpr")]
    head = [*keys, "calibration rows", "fit s"]
    lines = ["| case | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, m in rows:
        extra = [f"{m['calibration_rows']:.0f}", f"{m['fit_s']:.1f}"]
        lines.append(_fmt_row(name, m, keys, extra))
    return "\n".join(lines)


def write_results(out: Path, command: str, tables: str) -> None:
    """Replace the generated part of ``out`` (between the markers), keeping the notes around it."""
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    block = f"{start}\nCommand: `{command}`\n\n{tables}\n{end}"
    old = out.read_text(encoding="utf-8") if out.exists() else ""
    if start in old and end in old:
        text = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        text = f"# Detection quality\n\n{block}\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed ... + seeds - 1")
    p.add_argument("--only", nargs="+", help="dataset names (e.g. 6_cardio digits_576)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "quality.md")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="training config overrides (JSON values), e.g. latent=8 epochs=100",
    )
    p.add_argument("--save-json", type=Path, help="also write the per-dataset means here")
    p.add_argument(
        "--render",
        type=Path,
        nargs="+",
        help="no training: write the tables from --save-json files of runs split over processes",
    )
    p.add_argument(
        "--write",
        action="store_true",
        help="write the tables into --out even for a partial run (--only)",
    )
    a = p.parse_args()
    if a.render:
        saved = [json.loads(f.read_text()) for f in a.render]
        dev, extra = (_pooled([r for s in saved for r in s[part]]) for part in ("dev", "extra"))
        command = "; ".join(s["command"] for s in saved) + " (in parallel, then --render)"
        return report(a, dev, extra, command)
    cfg_extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    todo = [c for c in cases(a.data) if not a.only or c[0] in a.only]
    if not todo:
        print(f"no datasets in {a.data}", file=sys.stderr)
        return 1
    dev: list[tuple[str, dict[str, float]]] = []
    extra: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, X, y, cap in todo:
            seeds = range(a.first_seed, a.first_seed + a.seeds)
            runs = [run_one(X, y, s, cfg_extra, Path(tmp), cap) for s in seeds]
            mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            (extra if cap or name == "digits_576" else dev).append((name, mean))
            print(
                f"{name:18s} "
                + " ".join(
                    f"{st} {mean[f'{st}_auc']:.3f}/{mean[f'{st}_fpr']:.3f}"
                    for st in (*SCORES, "iforest")
                )
                + f"  fit {mean['fit_s']:.1f}s",
                flush=True,
            )
    command = f"python bench/quality.py --seeds {a.seeds}"
    command += f" --first-seed {a.first_seed}" if a.first_seed else ""
    command += (f" --only {' '.join(a.only)}" if a.only else "") + (
        f" --set {' '.join(a.set)}" if a.set else ""
    )
    if a.save_json:
        a.save_json.write_text(json.dumps({"command": command, "dev": dev, "extra": extra}))
    return report(a, dev, extra, command)


def _pooled(rows: list[list[Any]]) -> list[tuple[str, dict[str, float]]]:
    """Means of the runs saved for the same dataset (e.g. one seed per process), by name."""
    names = sorted({r[0] for r in rows})
    out = []
    for n in names:
        ms = [r[1] for r in rows if r[0] == n]
        out.append((n, {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}))
    return out


def report(
    a: argparse.Namespace,
    dev: list[tuple[str, dict[str, float]]],
    extra: list[tuple[str, dict[str, float]]],
    command: str,
) -> int:
    tables = "Mean over seeds. `*_fpr` = false-positive rate observed on the test normals at the "
    tables += "threshold calibrated for a 1% target; peers: PyOD ROC-AUC, same protocol.\n\n"
    if dev:
        tables += dev_table(dev, peers(a.data)) + "\n\n"
    if extra:
        tables += "Calibration cases (not in the mean above):\n\n" + case_table(extra) + "\n"
    print("\n" + tables)
    if a.only and not a.write and not a.render:
        print(f"\npartial run (--only): {a.out} left as it was (--write to replace its table)")
        return 0
    write_results(a.out, command, tables)
    print(f"\nwritten to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
