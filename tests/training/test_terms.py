"""The terms added to the VAE's scores (training/neighbours.py, training/tails.py) and the
robust early-stopping loss: each checked on toy data where it must make the difference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from service.bundle import MODEL_FILE
from service.features import encode_columns
from service.runtime import open_bundle
from tests.conftest import fit_small, small_config
from training import train as train_mod
from training.data import prepare
from training.neighbours import NeighbourTerm, near, rank_correlation, spread
from training.tails import GRID, MarginalTail
from training.train import _rows, _tensors, build_graph, fit, layout_of


def _graph_on(df: pd.DataFrame, **cfg: object) -> tuple[train_mod.ScoringGraph, list]:
    c = small_config(exclude=[], **cfg)
    prep = prepare(df, c)
    inputs = encode_columns(prep.features, prep.columns).inputs
    graph, _ = build_graph(layout_of(prep.features), inputs, prep.train_idx, prep.val_idx, c)
    return graph, prep.features


def _encode(features: list, df: pd.DataFrame) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return _tensors(
        encode_columns(features, {f.name: df[f.name].to_numpy() for f in features}).inputs
    )


def test_tail_is_the_rarer_side_summed_over_features() -> None:
    train = torch.arange(1000, dtype=torch.float32).reshape(-1, 1).repeat(1, 3)
    tail = MarginalTail(train)
    mid, low, high = [[500.0] * 3], [[-1.0, 500.0, 500.0]], [[500.0, 500.0, 5000.0]]
    got = tail(torch.tensor(mid + low + high))
    beyond = -np.log(1 / (GRID + 1))  # beyond every quantile: the rarest resolved
    mid_one = -np.log((GRID // 2 + 1) / (GRID + 1))
    assert got[0].item() == pytest.approx(3 * mid_one, rel=1e-5)
    assert got[1].item() == pytest.approx(beyond + 2 * mid_one, rel=1e-5)
    assert got[2].item() == pytest.approx(got[1].item(), rel=1e-5)  # either side alike


def test_tail_counts_a_value_on_a_tied_quantile_the_same_within_an_ulp() -> None:
    # a 0/1 column puts most quantiles on 0 and 1: one ulp (torch vs onnxruntime) must not move
    # a record across all of them
    train = torch.tensor([[0.0]] * 700 + [[1.0]] * 300)
    tail = MarginalTail(train)
    x = torch.tensor([[1.0], [float(np.nextafter(np.float32(1), np.float32(0)))], [1.0 + 1e-7]])
    got = tail(x)
    assert torch.allclose(got, got[0].expand(3))


def test_spread_of_mostly_tied_records_is_not_zero() -> None:
    # duplicates put most records at distance 0: a median absolute deviation of 0 would
    # give the term no weight (or an infinite one)
    x = torch.tensor([0.0] * 70 + [1.0, 2.0, 3.0] * 10)
    assert spread(x).item() > 0
    assert spread(torch.tensor([1.0, 2.0, 3.0, 4.0])).item() == pytest.approx(1.0)  # the MAD


def test_rank_correlation_is_spearmans_rho_with_tied_values_sharing_a_rank() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, 500).astype(np.float32)  # few values: most of them tied
    b = (a + rng.normal(0, 2, 500)).round().astype(np.float32)
    got = rank_correlation(torch.from_numpy(a), torch.from_numpy(b)).item()
    assert got == pytest.approx(spearmanr(a, b).correlation, abs=1e-5)
    assert rank_correlation(torch.ones(9), torch.arange(9.0)).item() == 0.0  # constant: none


def _fitted_tail_weight(tail_part: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    bank = torch.zeros(4, 2)
    term = NeighbourTerm(bank, bank, 1, MarginalTail(bank))
    parts = torch.stack([torch.rand(len(score)), torch.rand(len(score)), tail_part], 1)
    term.fit_weights(score.unsqueeze(1), parts, [1.0, 1.0, 2.0])
    return term.weight[0]


def test_tail_term_that_runs_against_the_score_gets_no_weight() -> None:
    # marginal rarity that ranks normal records against the likelihood (image-like data: a
    # pixel at its column's extreme is ordinary there) would only blur the score
    torch.manual_seed(0)
    score = torch.randn(400)
    against = _fitted_tail_weight(-score + 0.5 * torch.randn(400), score)
    assert against[2].item() == 0.0
    assert against[0].item() > 0 and against[1].item() > 0  # the distances keep theirs


def test_tail_term_weight_grows_with_its_agreement_with_the_score() -> None:
    torch.manual_seed(0)
    score, noise = torch.randn(400), torch.randn(400)
    close, loose = score + 0.3 * noise, score + 3.0 * noise
    w_close, w_loose = _fitted_tail_weight(close, score), _fitted_tail_weight(loose, score)
    # per unit of the part's own spread: strength 2 x rho, rho near 1 for the close one
    unit = 2.0 * (spread(score) / spread(close)).item()
    assert w_close[2].item() == pytest.approx(
        unit * rank_correlation(score, close).item(), rel=1e-5
    )
    assert 0 < (w_loose[2] * spread(loose)).item() < (w_close[2] * spread(close)).item()


def test_distance_sees_a_record_next_to_a_lone_training_record() -> None:
    # one stray training record far from the rest: a record beside it is not typical (the
    # nearest training record alone would call it as near as any)
    gen = torch.Generator().manual_seed(1)
    bank = torch.cat([torch.randn(500, 2, generator=gen), torch.tensor([[30.0, 30.0]])])
    typical = near(torch.randn(200, 2, generator=gen), bank)
    assert near(torch.tensor([[30.0, 30.0]]), bank)[0] > typical.max()


def _gaussians(n: int, seed: int, d: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(0, 1, (n, d)), columns=[f"c{j}" for j in range(d)])


def test_bank_keeps_thousands_of_training_records() -> None:
    # more records near a test record find its true neighbours (the dev sets gained most where
    # the training data has more than the 2048 records the bank once kept)
    df = _gaussians(3200, 7)
    c = small_config(exclude=[], epochs=2)
    prep = prepare(df, c)
    inputs = encode_columns(prep.features, prep.columns).inputs
    graph, _ = build_graph(layout_of(prep.features), inputs, prep.train_idx, prep.val_idx, c)
    assert graph.neighbours is not None
    assert graph.neighbours.bank_in.shape[0] == len(prep.train_idx) > 2048


def test_input_distance_sees_how_far_out_an_extreme_value_is() -> None:
    # the encoder clamps scaled values at 8 robust units; the distance must not: a value at 40
    # units is farther from every training record than one at 12
    df = _gaussians(600, 0)
    graph, features = _graph_on(df, epochs=3)
    iqr = float(df["c0"].quantile(0.75) - df["c0"].quantile(0.25))
    far = pd.DataFrame(
        {"c0": [12 * iqr, 40 * iqr], "c1": [0.0] * 2, "c2": [0.0] * 2, "c3": [0.0] * 2}
    )
    with torch.no_grad():
        space, mu = graph.inputs_and_means(*_encode(features, far))
        d = graph.neighbours.parts(space, mu, graph.pre.layout.n_num)  # type: ignore[union-attr]
    assert d[1, 0] > d[0, 0] + 20


@pytest.mark.slow
def test_tail_term_is_in_the_exported_graph_and_onnx_matches_torch(tmp_path: Path) -> None:
    # discrete columns (0/1, small counts) tie on many quantiles: the export check compares
    # onnxruntime with torch on them
    rng = np.random.default_rng(3)
    df = _gaussians(800, 3)
    df["flag"] = (rng.random(800) < 0.2).astype(float)
    df["count"] = rng.poisson(2, 800).astype(float)
    r = fit_small(df, tmp_path / "m", small_config(exclude=[]))
    assert r.manifest.model.max_rel_diff <= 1e-3
    model = onnx.load(str(r.path / MODEL_FILE))
    shapes = [tuple(t.dims) for t in model.graph.initializer]
    assert any(s[-2:] == (6, GRID) for s in shapes), shapes  # the tail's grid: 6 features
    # a record with one value far in its column's tail scores above every normal record
    bundle, onnx_model = open_bundle(r.path)
    odd = df.iloc[:1].copy()
    odd["count"] = 40.0
    enc = encode_columns(bundle.manifest.features, {c: odd[c].to_numpy() for c in odd})
    q = np.array(r.manifest.distributions["elbo"].quantiles)
    assert onnx_model.run(enc.inputs)["elbo"][0] > q.max()


def test_early_stopping_ignores_one_wild_validation_record() -> None:
    # a validation record with a value training never saw scores thousands of nats, and its
    # loss grows as the model sharpens: in a plain mean it would stop training at the start
    rng = np.random.default_rng(5)  # six columns driven by two factors: there is much to learn
    x = rng.normal(0, 1, (1200, 2)) @ rng.normal(0, 1, (2, 6)) + rng.normal(0, 0.1, (1200, 6))
    df = pd.DataFrame(x, columns=[f"c{j}" for j in range(6)])
    cfg = small_config(exclude=[], epochs=30, patience=5, beta_warmup_epochs=2)
    prep = prepare(df, cfg)
    inputs = encode_columns(prep.features, prep.columns).inputs
    val = _rows(inputs, prep.val_idx)
    val["x_num"][0, 0] = 1e3
    layout = layout_of(prep.features)
    _, _, hist = fit(layout, *_tensors(_rows(inputs, prep.train_idx)), _tensors(val), cfg, False)
    assert hist.best_epoch >= 15
