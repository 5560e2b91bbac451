"""The digits demo: scikit-learn's bundled 8x8 handwritten digits (no download) as 64 pixel
features of an image, a 2-D latent space, the digit's class as the map's color only."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from training.config import ColumnConfig, TrainConfig

SIZE = 8
DEMO_EPOCHS = 150


def pixel_names() -> list[str]:
    return [f"px_{r}_{c}" for r in range(SIZE) for c in range(SIZE)]


def digits_frame() -> pd.DataFrame:
    """1,797 digits: pixel intensities 0-16, row by row, and the class in ``digit``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    df = pd.DataFrame(np.asarray(d.data, dtype=np.float64), columns=pixel_names())
    df["digit"] = np.asarray(d.target).astype(str)
    return df


def digits_config(epochs: int = DEMO_EPOCHS, **kw: object) -> TrainConfig:
    return TrainConfig(
        name="demo-digits",
        latent=2,
        color_column="digit",
        image=[SIZE, SIZE],
        # pixels are intensities: numeric as they are (a mostly-blank pixel is not a category)
        columns={p: ColumnConfig(type="numeric", transform="none") for p in pixel_names()},
        epochs=epochs,
        **kw,  # type: ignore[arg-type]
    )


def train_digits(out: Path, epochs: int = DEMO_EPOCHS, progress: bool = True) -> Path:
    """Train the digits model into the bundle ``out``."""
    from training.train import train_bundle

    r = train_bundle(
        digits_frame(),
        out,
        digits_config(epochs),
        source="sklearn-digits",
        data_fingerprint="sklearn.datasets.load_digits()",
        progress=progress,
        overwrite=True,
    )
    return r.path


def digits_bundle(home: Path, progress: bool = True) -> Path:
    """The digits demo's bundle under ``home``, trained the first time it is asked for."""
    path = home / "demo" / "digits"
    if (path / "manifest.json").exists():
        return path
    print("training the digits model (once) ...", file=sys.stderr)
    return train_digits(path, progress=progress)
