"""A value the model has never seen is scored and named, never refused (service/values.py).

The parsing rules, type inference and the unusual-value checker; the demo model's unusual values
and partial success over HTTP (the app in process); the same values through the real
`vae-anomaly score` (slow). A messy file through every entry point: tests/e2e/test_entry_points.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service import values
from service.bundle import CategoricalFeature, NumericFeature, read_bundle
from service.features import encode_columns
from service.values import STABLE_UNSEEN_RATE, Invalid, parse
from tests.conftest import (
    SCORED_COLUMNS,
    InProcess,
    in_process,
    metric_samples,
    records,
    run_cli,
    value,
)
from training.data import DataError, column_values
from training.demo_data import generate_payments

# ---------------------------------------------------------------- the rules, in process


@pytest.mark.parametrize(
    "kind,given,expected",
    [
        ("numeric", 3, 3.0),
        ("numeric", "-2.5e3", -2500.0),
        ("numeric", "", None),
        ("numeric", 1e300, 1e300),  # far out, but a number: scored and named, not refused
        ("numeric", 10**320, values.FLOAT_MAX),  # beyond any float: as far out as one goes
        ("numeric", -(10**400), -values.FLOAT_MAX),
        ("boolean", 10**400, values.FLOAT_MAX),  # a number: named unusual
        ("boolean", "No", False),
        ("boolean", "ON", True),
        ("boolean", 0, False),
        ("boolean", 4, 4.0),  # a number: scored (as missing) and named unusual
        ("boolean", "1", True),
        ("categorical", 12, "12"),
        ("categorical", 12.0, "12"),
        ("categorical", 0.25, "0.25"),
        ("categorical", False, "False"),
        ("categorical", "", ""),
        ("categorical", 10**400, str(values.FLOAT_MAX)),  # as in a numeric column
    ],
)
def test_values_each_kind_accepts(kind: str, given: Any, expected: Any) -> None:
    got = parse(kind, given, 64)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "kind,given,reason",
    [
        ("numeric", "1.234,5", "wrong_type"),
        ("numeric", "€12", "wrong_type"),
        ("numeric", "Infinity", "wrong_type"),
        ("numeric", False, "wrong_type"),
        ("numeric", [1.0], "wrong_type"),
        ("numeric", float("-inf"), "not_finite"),
        ("numeric", float("nan"), "not_finite"),  # JSON's NaN token (a table's NaN: missing)
        ("boolean", float("nan"), "not_finite"),
        ("boolean", "maybe", "wrong_type"),
        ("boolean", "yEs", "wrong_type"),
        ("boolean", {"v": True}, "wrong_type"),
        ("categorical", ["a"], "wrong_type"),
        ("categorical", "z" * 65, "too_long"),
    ],
)
def test_values_that_cannot_be_of_the_column_are_invalid(
    kind: str, given: Any, reason: str
) -> None:
    with pytest.raises(Invalid) as e:
        parse(kind, given, 64)
    assert e.value.reason == reason


@pytest.mark.parametrize(
    "cells,kind",
    [
        ([0, 1, 1, 0, 1], "numeric"),  # a column of numbers is numeric, even only 0 and 1
        ([0.0, 1.0, None, 1.0, 0.0], "numeric"),
        (["yes", "no", "no", None, "yes"], "boolean"),
        (["Y", "N", "N", "Y", "N"], "boolean"),
        ([True, False, None, True, True], "boolean"),
        (["0", "1", "1", "0", "1"], "categorical"),  # text: codes, not true/false
        (["a", "b", 3, "a", "b"], "categorical"),
    ],
)
def test_type_inference(cells: list[Any], kind: str) -> None:
    got, _ = column_values(pd.Series(cells), "c", None)
    assert got == kind


def test_training_refuses_a_number_in_a_configured_boolean_column() -> None:
    assert column_values(pd.Series([0, 1, 1]), "c", "boolean")[0] == "boolean"
    with pytest.raises(DataError, match="'c' is boolean but holds 7"):
        column_values(pd.Series([0, 1, 7]), "c", "boolean")


def test_checker_flags_unseen_values_only_in_stable_columns() -> None:
    feats = [
        NumericFeature(
            name="x", column=0, nullable=False, center=0, scale=1, impute=0, min=1, max=9
        ),
        CategoricalFeature(
            name="steady", column=0, nullable=False, categories=["<unknown>", "<missing>", "a"]
        ),
        CategoricalFeature(
            name="churny",
            column=1,
            nullable=True,
            categories=["<unknown>", "<missing>", "a"],
            unseen_rate=0.2,
        ),
    ]
    enc = encode_columns(
        feats,
        {
            "x": [5.0, 17.0, 17.5, None, 3.5e38],
            "steady": ["a", "a", "a", "a", "new"],
            "churny": ["new", "a", "a", "a", "a"],
        },
    )
    found = enc.unusual
    assert found is not None and found.flag is not None
    kinds = {(name, kind): rows.tolist() for name, kind, rows in found.items}
    # 17 is the training maximum plus the range's width: not yet "far"
    assert kinds[("x", "out_of_range")] == [False, False, True, False, True]
    assert kinds[("x", "missing")] == [False, False, False, True, False]
    assert kinds[("steady", "unseen_category")] == [False, False, False, False, True]
    assert kinds[("churny", "unseen_category")] == [True, False, False, False, False]
    # the churny column's unseen value is named but not flagged; the rest are flagged
    assert found.flag.tolist() == [False, False, True, True, True]
    assert np.isfinite(enc.inputs["x_num"]).sum() == 4  # beyond float32: clipped, not inf


# ---------------------------------------------------------------- the demo model, over HTTP


@pytest.fixture(scope="module")
def client(bundle_dir: Path) -> Iterator[InProcess]:
    with in_process(bundle_dir) as c:
        yield c


def _normal_records(client: InProcess, n: int, seed: int) -> list[dict[str, Any]]:
    """Records of the demo data the model scores as normal, with nothing unusual."""
    recs = records(generate_payments(n, seed=seed))
    res = client.post("/v1/score", json={"records": recs}).json()["results"]
    return [r for r, x in zip(recs, res, strict=True) if not x["is_anomaly"]]


def test_an_unseen_category_in_a_stable_column_is_flagged(
    client: InProcess, bundle_dir: Path
) -> None:
    m = read_bundle(bundle_dir).manifest
    cats = {f.name: f for f in m.features if isinstance(f, CategoricalFeature)}
    assert cats["country"].unseen_rate <= STABLE_UNSEEN_RATE  # the demo's country is stable
    normal = _normal_records(client, 60, seed=501)
    assert len(normal) >= 50
    for field, new in (("country", "Atlantis"), ("merchant_category", "crypto_atm")):
        odd = [{**r, field: new} for r in normal]
        res = client.post("/v1/score", json={"records": odd}).json()["results"]
        assert all(x["is_anomaly"] for x in res), field
        assert all(x["score"] > x["threshold"] for x in res)
        assert all(
            x["unusual_values"]
            == [
                {
                    "field": field,
                    "value": new,
                    "kind": "unseen_category",
                    "why": "never seen in training",
                }
            ]
            for x in res
        )


@pytest.mark.parametrize(
    "field,given,kind,model_value",
    [
        ("card_present", 7, "not_boolean", 7.0),
        ("card_present", -1.5, "not_boolean", -1.5),
        ("amount", None, "missing", None),  # never missing in training: named, not refused
        ("hour", 4000, "out_of_range", 4000),
        ("tx_last_24h", -300, "out_of_range", -300),
    ],
)
def test_out_of_domain_values_are_scored_flagged_and_named(
    client: InProcess, field: str, given: Any, kind: str, model_value: Any
) -> None:
    rec = _normal_records(client, 5, seed=502)[0]
    r = client.post("/v1/score", json={"records": [rec, {**rec, field: given}]})
    assert r.status_code == 200, r.text
    plain, odd = r.json()["results"]
    assert plain["unusual_values"] == [] and not plain["is_anomaly"]
    assert odd["is_anomaly"] and odd["percentile"] >= plain["percentile"]
    [u] = odd["unusual_values"]
    assert (u["field"], u["kind"], u["value"]) == (field, kind, model_value)
    assert u["why"].startswith(values.WHY[kind])


@pytest.mark.parametrize(
    "field,given", [("tx_last_24h", 10_000), ("amount", 3.5e38), ("distance_from_home_km", -1e30)]
)
def test_the_value_that_is_off_leads_the_explanation(
    client: InProcess, field: str, given: float
) -> None:
    rec = next(r for r in _normal_records(client, 20, seed=503) if r[field] is not None)
    res = client.post("/v1/score", json={"records": [{**rec, field: given}]}).json()["results"][0]
    assert res["is_anomaly"] and math.isfinite(res["score"])
    top = res["top_features"][0]
    assert top["name"] == field and top["share"] > 0.5, res["top_features"]
    assert [u["field"] for u in res["unusual_values"]] == [field]


def test_a_value_that_cannot_be_of_its_column_is_still_a_422(client: InProcess) -> None:
    rec = _normal_records(client, 3, seed=504)[0]
    for field, given in (("amount", {"v": 1}), ("card_present", [True]), ("country", {})):
        r = client.post("/v1/score", json={"records": [{**rec, field: given}]})
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == field


def test_on_invalid_skip_scores_the_valid_records(client: InProcess) -> None:
    recs = records(generate_payments(6, seed=505))
    mixed = [*recs[:2], {**recs[2], "amount": "12 USD"}, recs[3], [1, 2], *recs[4:]]
    r = client.post("/v1/score", json={"records": mixed})
    assert r.status_code == 422  # reject, the default: nothing scored
    assert {e["record"] for e in r.json()["errors"]} == {2, 4}
    r = client.post("/v1/score", params={"on_invalid": "skip"}, json={"records": mixed})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == len(mixed)
    assert res[2]["errors"] == [
        {"field": "amount", "reason": "wrong_type", "message": res[2]["errors"][0]["message"]}
    ]
    assert "amount" in res[2]["error"] and res[4]["errors"][0]["reason"] == "not_an_object"
    valid = [r for i, r in enumerate(recs) if i != 2]
    alone = client.post("/v1/score", json={"records": valid}).json()["results"]
    got = [x["score"] for i, x in enumerate(res) if i not in (2, 4)]
    assert got == pytest.approx([x["score"] for x in alone], rel=1e-5)
    every = client.post(
        "/v1/score", params={"on_invalid": "skip"}, json={"records": [[1], "x"]}
    ).json()["results"]
    assert [set(x) for x in every] == [{"error", "errors"}] * 2
    bad = client.post("/v1/score", params={"on_invalid": "sometimes"}, json={"records": recs})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "on_invalid"


def test_unusual_values_are_counted_by_feature_and_kind(client: InProcess) -> None:
    rec = _normal_records(client, 3, seed=506)[0]
    before = metric_samples(client)
    odd = [{**rec, "card_present": 3}, {**rec, "card_present": 2, "country": "Oz"}, rec]
    assert client.post("/v1/score", json={"records": odd}).status_code == 200
    after = metric_samples(client)
    metric = "vae_anomaly_unusual_values_total"

    def delta(**labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert delta(feature="card_present", kind="not_boolean") == 2
    assert delta(feature="country", kind="unseen_category") == 1


def test_v2_accepts_the_same_values_and_lists_the_unusual_ones(
    client: InProcess, bundle_dir: Path
) -> None:
    m = read_bundle(bundle_dir).manifest
    recs = _normal_records(client, 5, seed=507)[:3]
    recs[1]["card_present"] = "yes"
    recs[2]["card_present"] = 7
    inputs = []
    for f in m.features:
        data = [r.get(f.name) for r in recs]
        dt = {"numeric": "FP64", "categorical": "BYTES", "boolean": "BYTES"}[f.kind]
        if f.kind == "boolean":  # a mixed tensor cannot be: each record its own datatype
            continue
        inputs.append({"name": f.name, "shape": [3], "datatype": dt, "data": data})
    outs = []
    for i, (dt, v) in enumerate((("BOOL", True), ("BYTES", "yes"), ("INT64", 7))):
        body = {
            "inputs": [{**t, "shape": [1], "data": [t["data"][i]]} for t in inputs]
            + [{"name": "card_present", "shape": [1], "datatype": dt, "data": [v]}]
        }
        r = client.post(f"/v2/models/{m.name}/infer", json=body)
        assert r.status_code == 200, r.text
        outs.append(r.json())
    assert "unusual_values" not in outs[0]["parameters"]
    assert "unusual_values" not in outs[1]["parameters"]
    [u] = outs[2]["parameters"]["unusual_values"]
    assert (u["index"], u["field"], u["kind"], u["value"]) == (0, "card_present", "not_boolean", 7)
    assert outs[2]["outputs"][1]["data"] == [True]  # is_anomaly


# ---------------------------------------------------------------- the bulk CLI


@pytest.mark.slow  # the real `vae-anomaly score`
def test_bulk_scoring_never_hides_a_bad_value(
    bundle_dir: Path, tmp_path: Path, client: InProcess
) -> None:
    rec = _normal_records(client, 3, seed=508)[0]
    cells = ["100,000.00", "$100000", "inf", "", "100000", str(rec["amount"])]
    df = pd.DataFrame([{**rec, "amount": c} for c in cells])
    data, out = tmp_path / "odd.csv", tmp_path / "odd.csv.out.csv"
    df.to_csv(data, index=False)
    r = run_cli("score", bundle_dir, data, "--out", out, "--quiet", timeout=180)
    assert r.returncode == 0, r.stderr
    got = pd.read_csv(out, dtype={"is_anomaly": str})
    assert list(got.columns) == ["transaction_id", *SCORED_COLUMNS]
    # text that is no number: not scored, the error says which column and why
    for i in range(3):
        assert got["error"][i].startswith("amount: expected a number"), got.iloc[i]
        assert math.isnan(got["score"][i])
    # an empty cell in a column never missing in training: scored, flagged and named
    assert got["unusual"][3].startswith("amount=null (missing") and got["is_anomaly"][3] == "True"
    served = client.post("/v1/score", json={"records": [{**rec, "amount": 100000}]}).json()
    assert got["is_anomaly"][4] == "True" and served["results"][0]["is_anomaly"]
    assert got["score"][4] == pytest.approx(served["results"][0]["score"], rel=1e-5)
    assert got["is_anomaly"][5] == "False" and pd.isna(got["error"][5])
    assert "3 invalid record(s)" in r.stderr


@pytest.mark.slow  # the real `vae-anomaly score`
def test_bulk_jsonl_lines_that_are_not_records_are_errors(bundle_dir: Path, tmp_path: Path) -> None:
    recs = records(generate_payments(4, seed=509))
    lines = [
        json.dumps(recs[0]),
        "[1, 2, 3]",
        json.dumps(recs[1]),
        "{oops",
        "7",
        json.dumps(recs[2]),
    ]
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    data.write_text("\n".join(lines) + "\n")
    r = run_cli(
        "score", bundle_dir, data, "--out", out, "--quiet", "--chunk-size", "2", timeout=180
    )
    assert r.returncode == 0, r.stderr
    got = pd.read_json(out, lines=True)
    errors = got["error"].tolist()
    assert [e is not None and not pd.isna(e) for e in errors] == [
        False,
        True,
        False,
        True,
        True,
        False,
    ]
    assert errors[1] == "line 2: not a JSON object (a JSON list)"
    assert errors[3] == "line 4: not valid JSON"
    assert got["transaction_id"][[0, 2, 5]].tolist() == [
        recs[i]["transaction_id"] for i in (0, 1, 2)
    ]


@pytest.mark.slow  # the real `vae-anomaly score`
def test_bulk_id_columns_cannot_clash_and_keep_one_type(bundle_dir: Path, tmp_path: Path) -> None:
    df = generate_payments(30, seed=510)
    data = tmp_path / "in.csv"
    df.assign(score=1.0).to_csv(data, index=False)
    r = run_cli(
        "score",
        bundle_dir,
        data,
        "--out",
        tmp_path / "o.csv",
        "--quiet",
        "--id-column",
        "score",
        timeout=180,
    )
    assert r.returncode == 2 and "'score'" in r.stderr and "overwritten" in r.stderr
    # integer ids, one chunk with an empty one (pandas reads it as floats): still integers
    ids = pd.Series(range(1000, 1030), dtype="Int64")
    ids[25] = pd.NA
    df.assign(ref=ids).to_csv(data, index=False)
    out = tmp_path / "o.parquet"
    by_ref = ["score", bundle_dir, data, "--out", out, "--quiet", "--id-column", "ref"]
    r = run_cli(*by_ref, "--chunk-size", "10", timeout=180)
    assert r.returncode == 0, r.stderr
    table = pq.read_table(out)
    assert table.schema.field("ref").type == pa.int64()
    assert table["ref"].to_pylist()[24:27] == [1024, None, 1026]
    # ids that turn from numbers into text: a clear error, no file left behind
    mixed = df.assign(ref=[str(i) for i in range(10)] + [f"x{i}" for i in range(20)])
    mixed.to_csv(data, index=False)
    out.unlink()
    r = run_cli(*by_ref, "--chunk-size", "10", timeout=180)
    assert r.returncode == 2 and "changes type between chunks" in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- a messy file, round trip
