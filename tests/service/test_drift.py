"""Drift: the reference in the bundle, PSI, the live counters, the offline command, the retrain
table. A real Prometheus computing PSI from the real service: tests/e2e/test_drift_monitoring.py."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from prometheus_client import REGISTRY

from service import metrics
from service.bundle import (
    MANIFEST_FILE,
    MISSING_TOKEN,
    UNKNOWN_TOKEN,
    BooleanFeature,
    CategoricalFeature,
    NumericFeature,
    read_bundle,
)
from service.drift import OTHER_TOKEN, Buckets, DriftCounter, build_reference, psi, tracked
from service.drift_report import drift_file, drift_table
from service.features import encode_columns
from service.scoring import Scorer
from service.settings import load_settings
from tests.conftest import cli_executable, drift_json, grocery_heavy, records, shifted_age
from training.demo_data import generate_payments
from training.train import Result

# ---------------------------------------------------------------- PSI and buckets


def test_psi_known_values_and_empty_buckets() -> None:
    # (0.8 - 0.5) ln 1.6 + (0.2 - 0.5) ln 0.4, the empty bucket on both sides adds 0
    assert psi(np.array([80, 20, 0]), [0.5, 0.5, 0.0]) == pytest.approx(0.415888, abs=1e-6)
    assert psi(np.array([50, 50]), [0.5, 0.5]) == 0.0
    # a bucket empty now but 30% in training: floored at 1e-4, finite, and large
    got = psi(np.array([0, 100]), [0.3, 0.7])
    assert got is not None and math.isfinite(got)
    assert got == pytest.approx((1e-4 - 0.3) * math.log(1e-4 / 0.3) + 0.3 * math.log(1 / 0.7))
    assert psi(np.array([0, 0]), [0.5, 0.5]) is None  # no traffic: no PSI, not NaN


def test_numeric_buckets_with_ties_are_right_closed_and_deduplicated() -> None:
    f = NumericFeature(
        name="visits", column=0, nullable=True, center=1, scale=1, impute=1, min=0, max=3
    )
    x = np.array([0.0] * 50 + [1.0] * 30 + [2.0] * 15 + [3.0] * 3 + [np.nan] * 2)
    inputs = {"x_num": x.astype(np.float32)[:, None]}
    ref = build_reference([f], inputs, np.arange(len(x), dtype=float)).features[0]
    assert ref.edges == sorted(set(ref.edges)) and len(ref.edges) < 9  # ties merged
    assert ref.buckets[-1] == MISSING_TOKEN and len(ref.buckets) == len(ref.edges) + 2
    # by hand: the first edge a value does not exceed
    by_hand = [0] * len(ref.buckets)
    for v in x:
        i = len(ref.buckets) - 1 if np.isnan(v) else sum(v > e for e in ref.edges)
        by_hand[i] += 1
    assert ref.expected == pytest.approx([c / len(x) for c in by_hand])
    assert ref.expected[-1] == pytest.approx(0.02)
    assert ref.ks_cdf[-1] == 1.0 and ref.ks_values == sorted(ref.ks_values)


def test_categorical_and_boolean_buckets() -> None:
    cats = [f"c{i:02d}" for i in range(15)]
    fc = CategoricalFeature(
        name="shop",
        column=0,
        nullable=True,
        categories=[UNKNOWN_TOKEN, MISSING_TOKEN, *cats],
    )
    fb = BooleanFeature(name="online", column=0, nullable=False, rate=0.5)
    rng = np.random.default_rng(1)
    shop = [f"c{min(int(rng.exponential(3)), 14):02d}" for _ in range(997)] + ["new", None, None]
    online = rng.random(1000) < 0.3
    inputs = encode_columns([fb, fc], {"online": online, "shop": shop}).inputs
    ref = build_reference([fb, fc], inputs, rng.random(1000))
    b, c = ref.features
    assert b.buckets == ["false", "true", MISSING_TOKEN]
    assert b.expected == pytest.approx([1 - online.mean(), online.mean(), 0.0])
    assert len(c.buckets) == 13 and c.buckets[-3:] == [OTHER_TOKEN, UNKNOWN_TOKEN, MISSING_TOKEN]
    assert c.buckets[0] == "c00"  # the most common first
    assert c.expected[-2:] == pytest.approx([0.001, 0.002])
    assert sum(c.expected) == pytest.approx(1.0)
    # the score: deciles, about a tenth each
    assert len(ref.score.buckets) == 10
    assert ref.score.expected == pytest.approx([0.1] * 10, abs=0.002)


def test_the_trained_bundle_has_a_reference(trained: Result) -> None:
    ref = trained.manifest.reference
    assert ref is not None and ref.rows == trained.manifest.data.calibration_rows
    assert [r.name for r in ref.features] == [f.name for f in trained.manifest.features]
    for r in ref.features:
        assert len(r.buckets) <= 13 and sum(r.expected) == pytest.approx(1.0)
    assert sum(ref.score.expected) == pytest.approx(1.0)


# ---------------------------------------------------------------- live counters (in process)


def counted(scorer: Scorer) -> dict[tuple[str, str], float]:
    m = scorer.manifest
    out = {}
    for fam in REGISTRY.collect():
        for s in fam.samples:
            lab = s.labels
            if s.name.endswith("_total") and lab.get("version") == m.version and "bucket" in lab:
                out[(lab.get("feature", "<score>"), lab["bucket"])] = s.value
    return out


def test_live_counts_give_the_offline_psi_and_a_reload_drops_the_series(
    bundle_dir: Path, tmp_path: Path
) -> None:
    df = shifted_age(generate_payments(700, seed=41))
    df.to_csv(tmp_path / "recent.csv", index=False)
    offline = drift_file(read_bundle(bundle_dir), tmp_path / "recent.csv", threads=1)
    scorer = Scorer(bundle_dir)
    scorer.drift.retire()  # from zero: apps tested in this process counted this version too
    scorer.drift.publish()
    cols = records_columns(df)
    for lo in range(0, 700, 100):  # several micro-batches
        metrics.scored(scorer, [({k: v[lo : lo + 100] for k, v in cols.items()}, None)])
    live = counted(scorer)
    for d in offline.features:
        counts = np.array([live[(d.feature, b)] for b in d.buckets])
        assert psi(counts, d.expected) == pytest.approx(d.psi, abs=1e-9), d.feature
    top = offline.ranked()[0]
    assert top.feature == "customer_age" and (top.psi or 0) > 0.2
    scorer.drift.retire()  # a new version serves: this one's series go
    assert counted(scorer) == {}


def test_tracked_features_setting(trained: Result) -> None:
    m = trained.manifest
    assert [r.name for r in tracked(m, "auto")] == [f.name for f in m.features]
    assert tracked(m, "none") == []
    assert [r.name for r in tracked(m, " country, nope ,amount")] == ["country", "amount"]
    assert load_settings(drift_features="country").drift_features == "country"
    counter = DriftCounter(m, "country")
    assert {f for f, _ in counter.buckets.labels} == {"country"}
    assert Buckets(m.features, []).n == 0


@pytest.mark.slow  # the real `vae-anomaly drift`
def test_a_bundle_without_reference_scores_without_drift_series(
    bundle_dir: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(bundle_dir, old)
    raw = json.loads((old / MANIFEST_FILE).read_text())
    del raw["reference"]
    (old / MANIFEST_FILE).write_text(json.dumps(raw))
    scorer = Scorer(old)
    scorer.drift.publish()
    cols = records_columns(generate_payments(3, seed=5))
    metrics.scored(scorer, [({k: v[:3] for k, v in cols.items()}, None)])
    assert counted(scorer) == {}
    r = subprocess.run(
        [cli_executable(), "drift", str(old), str(write_table(tmp_path, generate_payments(60)))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "no drift reference" in r.stderr


def records_columns(df: pd.DataFrame) -> dict[str, list[Any]]:
    recs = records(df.drop(columns=["transaction_id"]))
    return {k: [r[k] for r in recs] for k in recs[0]}


def write_table(tmp: Path, df: pd.DataFrame, name: str = "data.csv") -> Path:
    """``df`` as CSV, JSON Lines or Parquet, by the name's suffix."""
    path = tmp / name
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    return path


# ---------------------------------------------------------------- offline command, retrain table


@pytest.mark.slow  # the real `vae-anomaly drift`
def test_drift_command_names_the_shifted_feature(bundle_dir: Path, tmp_path: Path) -> None:
    same = drift_json(bundle_dir, write_table(tmp_path, generate_payments(3000, seed=7)), tmp_path)
    assert same["records"] == 3000
    assert all(f["psi"] < 0.1 for f in same["features"]), same
    assert same["score"]["psi"] < 0.1
    ks = {f["feature"]: f["ks"] for f in same["features"]}
    assert ks["customer_age"] < 0.1 and ks["merchant_category"] is None

    moved = shifted_age(generate_payments(3000, seed=7))
    got = drift_json(bundle_dir, write_table(tmp_path, moved, "moved.jsonl"), tmp_path)
    first, *rest = got["features"]
    assert first["feature"] == "customer_age" and first["psi"] > 0.2 and first["ks"] > 0.2
    assert all(f["psi"] < 0.1 for f in rest)
    report = (tmp_path / "r.html").read_text()
    assert "customer_age" in report and "drifted" in report

    mix = grocery_heavy(generate_payments(3000, seed=8), seed=8)
    table = subprocess.run(
        [
            cli_executable(),
            "drift",
            str(bundle_dir),
            str(write_table(tmp_path, mix, "mix.parquet")),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[2].split()[0] == "merchant_category" and lines[2].endswith("drifted")
    assert (tmp_path / "drift-report.html").is_file()


def test_retrain_table_says_which_features_moved(trained: Result) -> None:
    rows = drift_table(trained.manifest, shifted_age(generate_payments(2000, seed=9)))
    assert len(rows) == 3 and "customer_age" in rows[0][0] and float(rows[0][1]) > 0.2
    assert float(rows[1][1]) < 0.1


# ---------------------------------------------------------------- a real Prometheus


def test_the_scorer_alone_counts_no_drift(bundle_dir: Path) -> None:
    """The service counts drift around the scorer (metrics.scored): a library user's scoring,
    even of a published model, moves no series."""
    scorer = Scorer(bundle_dir)
    scorer.drift.retire()  # from zero: apps tested in this process counted this version too
    scorer.drift.publish()
    cols = records_columns(generate_payments(50, seed=9))
    scorer.score(cols, None)
    live = counted(scorer)
    assert live and not any(live.values())
    metrics.scored(scorer, [(cols, None)])
    assert sum(counted(scorer).values()) > 0
    scorer.drift.retire()
