"""Shared fixtures: sample payments and a small bundle trained once per test session."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from training.config import TrainConfig
from training.demo_data import generate_payments
from training.train import Result, train_bundle

TRAIN_ROWS = 5000
EPOCHS = 40  # small and quick; early stopping may end sooner


def small_config(**kw: object) -> TrainConfig:
    base: dict[str, object] = {"exclude": ["transaction_id"], "epochs": EPOCHS, "threads": 2}
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def train_df() -> pd.DataFrame:
    return generate_payments(TRAIN_ROWS, seed=0)


@pytest.fixture(scope="session")
def trained(train_df: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Result:
    out = tmp_path_factory.mktemp("bundles") / "payments"
    return train_bundle(
        train_df,
        out,
        small_config(name="payments"),
        source="payments.csv",
        data_fingerprint="test",
        progress=False,
    )


@pytest.fixture(scope="session")
def bundle_dir(trained: Result) -> Path:
    return trained.path
