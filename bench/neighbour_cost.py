"""What the neighbour term costs in serving: single-record and 256-record scoring latency with
onnxruntime directly (1 thread), and the model file's size: without the terms, with the
neighbour term, with the neighbour and the tail term.

    python bench/neighbour_cost.py [--data ../shared/data/adbench] [--repeat 2000]
                                   [--banks 2048 16384]

Each data set's normal records up to 20,000 are the training data, so the bank (at most
``neighbour_bank`` of the training records) is as large as the bank size asked where the data
has that many records (5_campaign; 6_cardio and the digits have fewer).

Models are trained for a few epochs only: the cost does not depend on how well they fit.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from quality import DEFAULT_DATA, wide_digits  # type: ignore[import-not-found]

from service.features import encode_columns
from service.runtime import OnnxModel, open_bundle
from training.config import TrainConfig
from training.train import train_bundle


def latency_us(model: OnnxModel, inputs: dict[str, np.ndarray], repeat: int) -> float:
    """Median microseconds of one session.run."""
    names = model.output_names
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        model.session.run(names, inputs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def measure(name: str, X: np.ndarray, repeat: int, tmp: Path, banks: list[int]) -> None:
    cols = [f"f{i}" for i in range(X.shape[1])]
    df = pd.DataFrame(X, columns=cols)
    for w, tail, bank in ((0.0, 0.0, 0), *((2.0, 0.5, b) for b in banks)):
        cfg = TrainConfig(
            epochs=3, neighbour_weight=w, tail_weight=tail, threads=1, neighbour_bank=max(bank, 1)
        )
        out = tmp / f"{name}{w}{tail}{bank}"
        r = train_bundle(df, out, cfg, source=name, data_fingerprint="-", progress=False)
        bundle, _ = open_bundle(r.path)
        model = OnnxModel(r.path / "model.onnx", intra_op_threads=1)
        feats = bundle.manifest.features
        enc = encode_columns(feats, {f.name: df[f.name].to_numpy()[:256] for f in feats}).inputs
        one = {k: v[:1] for k, v in enc.items()}
        size = (r.path / "model.onnx").stat().st_size / 1e6
        print(
            f"| {name} ({X.shape[1]} columns) | {w:g} | {tail:g} | {min(bank, len(X) * 7 // 10)} | "
            f"{latency_us(model, one, repeat):.0f} | "
            f"{latency_us(model, enc, max(20, repeat // 50)) / 1000:.2f} | {size:.1f} |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--repeat", type=int, default=2000)
    p.add_argument("--banks", type=int, nargs="+", default=[TrainConfig().neighbour_bank])
    a = p.parse_args()
    print(
        "| data | neighbour_weight | tail_weight | bank | 1 record, µs | 256 records, ms "
        "| model.onnx MB |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("6_cardio", "5_campaign"):
            d = np.load(a.data / f"{name}.npz", allow_pickle=False)
            X = d["X"][d["y"] == 0].astype(np.float64)
            measure(name, X[:20000], a.repeat, Path(tmp), a.banks)
        X, y = wide_digits()
        measure("digits_576", X[y == 0], a.repeat, Path(tmp), a.banks)


if __name__ == "__main__":
    main()
