"""A messy training file (yes/no booleans, 0/1 counts, store codes that look like numbers) whose
every row goes through all three entry points: the bulk CLI and the real service's native and
V2 APIs, each reading it by the same rules (service/values.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from service.bundle import read_bundle
from tests.conftest import records, run_cli, run_server, small_config
from training.train import train_bundle


def _messy(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "ref": [f"r{i}" for i in range(n)],
            "weight": np.round(rng.lognormal(3, 0.4, n), 1),
            "returned": rng.choice(["yes", "no"], n, p=[0.2, 0.8]).astype(object),
            "express": rng.choice(["Y", "N"], n),
            "repeat": rng.integers(0, 2, n),  # a 0/1 count: numeric
            "items": rng.poisson(3, n) + 1,
            "store": rng.choice(["12", "15", "40", "A7"], n),  # codes, some of them numbers
            "rating": np.where(rng.random(n) < 0.1, np.nan, rng.integers(1, 6, n)),
        }
    )
    df.loc[rng.random(n) < 0.1, "returned"] = None
    return df


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("messy")
    data = root / "orders.csv"
    _messy(600, seed=511).to_csv(data, index=False)
    cfg = small_config(exclude=["ref"], epochs=6, name="orders")
    train_bundle(
        pd.read_csv(data),
        root / "bundle",
        cfg,
        source=str(data),
        data_fingerprint="t",
        progress=False,
    )
    return data, root / "bundle"


def test_every_training_row_goes_through_every_entry_point(
    messy: tuple[Path, Path], tmp_path: Path
) -> None:
    data, bundle = messy
    m = read_bundle(bundle).manifest
    kinds = {f.name: f.kind for f in m.features}
    assert kinds == {
        "weight": "numeric",
        "repeat": "numeric",
        "items": "numeric",
        "rating": "numeric",
        "returned": "boolean",
        "express": "boolean",
        "store": "categorical",
    }
    df = pd.read_csv(data)
    recs = records(df)  # as a client would send the file's rows: "yes", 1, "A7", 40, null
    assert {type(r["store"]) for r in recs} == {str}
    r = run_cli("score", bundle, data, "--out", tmp_path / "out.csv", "--quiet", timeout=180)
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(tmp_path / "out.csv")["error"].isna().all()
    with (
        run_server(["serve", "--bundle", str(bundle)], tmp_path) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
        for i in range(0, len(recs), 200):
            chunk = recs[i : i + 200]
            r = c.post("/v1/score", json={"records": chunk})
            assert r.status_code == 200, r.text
            assert not [x for x in r.json()["results"] if x["unusual_values"]]
            # the store codes sent as numbers where they are numbers: the same values
            as_numbers = [
                {**x, "store": int(x["store"]) if x["store"].isdigit() else x["store"]}
                for x in chunk
            ]
            r2 = c.post("/v1/score", json={"records": as_numbers})
            assert [x["score"] for x in r2.json()["results"]] == [
                x["score"] for x in r.json()["results"]
            ]
            inputs = [
                {"name": k, "shape": [len(chunk)], "datatype": dt, "data": [x[k] for x in chunk]}
                for k, dt in (
                    ("weight", "FP64"),
                    ("repeat", "INT64"),
                    ("items", "INT64"),
                    ("rating", "FP64"),
                    ("returned", "BYTES"),
                    ("express", "BYTES"),
                    ("store", "BYTES"),
                )
            ]
            r = c.post(f"/v2/models/{m.name}/infer", json={"inputs": inputs})
            assert r.status_code == 200, r.text
        # and the 0/1 count column takes any count: scored, flagged and named
        r = c.post("/v1/score", json={"records": [{**recs[0], "repeat": 7}]})
        assert r.status_code == 200, r.text
        [u] = r.json()["results"][0]["unusual_values"]
        assert (u["field"], u["kind"]) == ("repeat", "out_of_range")
        assert r.json()["results"][0]["is_anomaly"]
