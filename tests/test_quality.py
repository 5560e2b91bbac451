"""Detection quality parts: the neighbour term, an ensemble of VAEs in one graph, cross-fitted
calibration of small data, and the stated precision of the threshold (in the manifest, also for
bundles written before it)."""

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
from tests.conftest import small_config
from training.export import TOLERANCE
from training.model import VAE, Ensemble, Layout, Preprocess, ScoringGraph
from training.neighbours import nearest_distance
from training.retrain import serving_weights
from training.train import train_bundle


def test_nearest_distance_is_exact_even_at_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = 300.0 + torch.randn(500, 40, generator=gen)  # large norms: cancellation territory
    q = torch.cat([bank[:5], bank[5:10] + 0.01, 300.0 + torch.randn(20, 40, generator=gen)])
    want = np.sqrt(((q[:, None, :] - bank[None]).double() ** 2).sum(-1)).min(1).values.numpy()
    got = nearest_distance(q, bank).double().numpy()
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
        r = train_bundle(
            df,
            tmp_path / f"w{w}",
            small_config(exclude=[], neighbour_weight=w),
            source="x.csv",
            data_fingerprint="-",
            progress=False,
        )
        normal = np.array(r.manifest.distributions["elbo"].quantiles)
        out[w] = float(np.mean(normal < _scores(r.path, gap)[0]))  # the gap's percentile
    assert out[2.0] >= out[0.0] and out[2.0] > 0.99


@pytest.mark.slow
def test_small_data_calibrates_on_every_record_and_says_how_precisely(tmp_path: Path) -> None:
    df = _clusters(200, 1)
    r = train_bundle(
        df,
        tmp_path / "m",
        small_config(exclude=[]),
        source="x.csv",
        data_fingerprint="-",
        progress=False,
    )
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


def _graph(seed: int, n_in: int = 3) -> ScoringGraph:
    torch.manual_seed(seed)
    layout = Layout([0.0] * n_in, [1.0] * n_in, [False] * n_in, [], [False] * n_in, [])
    vae = VAE(layout, [8], 2, 0.05)
    return ScoringGraph(Preprocess(layout), vae, torch.randn(4, 2), torch.zeros(n_in)).eval()


def test_ensemble_averages_standardised_member_scores_in_the_first_members_units() -> None:
    a, b = _graph(0), _graph(1)
    center = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    scale = torch.tensor([[1.0, 2.0, 4.0], [5.0, 0.5, 1.0]])
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = Ensemble([a, b], center, scale).eval()(x)
        sa, sb = (torch.stack(g(x)[:3], 1) for g in (a, b))
        z = ((sa - center[0]) / scale[0] + (sb - center[1]) / scale[1]) / 2
        want = z * scale[0] + center[0]
        for i in range(3):
            assert torch.allclose(got[i], want[:, i], rtol=1e-5, atol=1e-5)
        assert torch.allclose(got[3], (a(x)[3] + b(x)[3]) / 2)


@pytest.mark.slow
def test_an_ensemble_bundle_is_one_checked_graph_and_warm_starts_a_retrain(
    tmp_path: Path,
) -> None:
    df = _clusters(1500, 3)
    cfg = small_config(exclude=[], members=2)
    r = train_bundle(df, tmp_path / "e", cfg, source="x.csv", data_fingerprint="-", progress=False)
    assert r.manifest.model.max_rel_diff <= TOLERANCE  # the export check ran on the ensemble
    bundle, _ = open_bundle(r.path)
    weights = serving_weights(bundle)
    assert weights and all(not k.startswith(("members", "vae")) for k in weights)
    warm = train_bundle(
        df,
        tmp_path / "w",
        small_config(exclude=[], members=2, epochs=1),
        source="x.csv",
        data_fingerprint="-",
        progress=False,
        init_weights=weights,
    )
    assert warm.history.warm_started_tensors == len(weights)
    # scores of fresh normal records sit below the threshold about as often as calibrated
    fresh = _scores(r.path, _clusters(4000, 4))
    assert 0.002 < float(np.mean(fresh > r.manifest.thresholds["elbo"].value)) < 0.03
