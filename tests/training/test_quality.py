"""Detection quality parts: the neighbour term, cross-fitted calibration of small data, and the
stated precision of the threshold (in the manifest, also for bundles written before it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from service.bundle import MANIFEST_FILE, read_bundle
from service.features import encode_columns
from service.runtime import open_bundle
from tests.conftest import fit_small, small_config
from training.neighbours import nearest


def test_nearest_distances_are_exact_even_at_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = 300.0 + torch.randn(500, 40, generator=gen)  # large norms: cancellation territory
    q = torch.cat([bank[:5], bank[5:10] + 0.01, 300.0 + torch.randn(20, 40, generator=gen)])
    want = np.sqrt(((q[:, None, :] - bank[None]).double() ** 2).sum(-1)).min(1).values.numpy()
    got = nearest(q, bank, 1)[:, 0].double().numpy()
    assert np.all(got[:5] == 0.0)  # a record seen in training is at distance 0, not sqrt(eps)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4)


def _clusters(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    centre = rng.choice([-4.0, 4.0], size=(n, 1))
    return pd.DataFrame(centre + rng.normal(0, 0.5, (n, 3)), columns=["a", "b", "c"])


def _scores(path: Path, df: pd.DataFrame) -> np.ndarray:
    bundle, model = open_bundle(path)
    feats = bundle.manifest.features
    enc = encode_columns(feats, {f.name: df[f.name].to_numpy() for f in feats})
    return model.run(enc.inputs)["elbo"]


@pytest.mark.slow
def test_neighbour_term_raises_records_no_training_record_is_near(tmp_path: Path) -> None:
    # two clusters; a record halfway between them is near no training record
    df, gap = _clusters(1500, 0), pd.DataFrame({"a": [0.0], "b": [0.0], "c": [0.0]})
    out = {}
    for w in (0.0, 2.0):
        r = fit_small(df, tmp_path / f"w{w}", small_config(exclude=[], neighbour_weight=w))
        normal = np.array(r.manifest.distributions["elbo"].quantiles)
        out[w] = float(np.mean(normal < _scores(r.path, gap)[0]))  # the gap's percentile
    assert out[2.0] >= out[0.0] and out[2.0] > 0.99


@pytest.mark.slow
def test_small_data_calibrates_on_every_record_and_says_how_precisely(tmp_path: Path) -> None:
    df = _clusters(200, 1)
    r = fit_small(df, tmp_path / "m", small_config(exclude=[]))
    m = r.manifest
    assert m.data.calibration_rows < 99  # too few for an order statistic at 1%
    assert m.metrics["calibration_scores"] == len(df)  # out of fold: every normal record
    t = m.thresholds["elbo"]
    assert "out-of-fold" in t.method and t.fpr_interval is not None
    lo, hi = t.fpr_interval
    assert lo < m.target_fpr < hi
    assert any("imprecise" in w for w in r.warnings)
    # new normal records alarm near the target rate, not several times it
    fresh = _scores(r.path, _clusters(20_000, 2))
    assert 0.002 <= float(np.mean(fresh > t.value)) <= 0.03


def test_bundle_without_fpr_interval_still_loads(bundle_dir: Path, tmp_path: Path) -> None:
    assert read_bundle(bundle_dir).manifest.thresholds["elbo"].fpr_interval is not None
    old = tmp_path / "old"
    shutil.copytree(bundle_dir, old)
    raw = json.loads((old / MANIFEST_FILE).read_text())
    for t in raw["thresholds"].values():
        del t["fpr_interval"]
    (old / MANIFEST_FILE).write_text(json.dumps(raw))
    assert read_bundle(old).manifest.thresholds["elbo"].fpr_interval is None
