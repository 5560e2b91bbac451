"""The HTTP API in process: the app that `serve` runs, driven through httpx's ASGI transport
(tests/conftest.py `InProcess`): scoring, validation and error bodies, API keys, the schema,
V2 and the metrics, without a server process."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from service.bundle import read_bundle
from service.features import encode_columns
from service.runtime import open_bundle
from tests.conftest import InProcess, in_process, metric_samples, records, v2_body, value
from training.demo_data import generate_payments, make_anomalies

MAX_RECORDS = 100
MAX_BODY = 64 * 1024
KEY = "in-process-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client(bundle_dir: Path) -> Iterator[InProcess]:
    with in_process(bundle_dir, max_records=MAX_RECORDS, max_body_bytes=MAX_BODY) as c:
        yield c


@pytest.fixture(scope="module")
def defaults(bundle_dir: Path) -> Iterator[InProcess]:
    """The default settings (a 16 MiB body limit)."""
    with in_process(bundle_dir) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(bundle_dir: Path) -> Iterator[InProcess]:
    """Scoring and the metadata (metrics, API docs) behind an API key."""
    with in_process(bundle_dir, api_keys=KEY, protect_metadata=True) as c:
        yield c


# ---------------------------------------------------------------- scoring


def test_normal_and_anomalous_records(client: InProcess, bundle_dir: Path) -> None:
    m = read_bundle(bundle_dir).manifest
    normal = records(generate_payments(MAX_RECORDS, seed=31))
    bad = records(make_anomalies(50, seed=31))
    rn = client.post("/v1/score", json={"records": normal})
    ra = client.post("/v1/score", json={"records": bad})
    assert rn.status_code == 200 and ra.status_code == 200, rn.text + ra.text
    body_n, body_a = rn.json(), ra.json()
    assert body_n["model"] == {"name": m.name, "version": m.version, "score_type": m.default_score}
    res_n, res_a = body_n["results"], body_a["results"]
    assert len(res_n) == MAX_RECORDS and len(res_a) == 50
    thr = m.thresholds[m.default_score].value
    for r in res_n + res_a:
        assert r["threshold"] == pytest.approx(thr)
        assert r["is_anomaly"] == (r["score"] > thr)
        assert 0.0 <= r["percentile"] <= 100.0
        assert len(r["top_features"]) <= 3
        assert {t["name"] for t in r["top_features"]} <= {f.name for f in m.features}
        assert all(0 < t["share"] <= 1 for t in r["top_features"])
    assert sum(r["is_anomaly"] for r in res_n) <= 5  # target 1% of 100
    assert sum(r["is_anomaly"] for r in res_a) >= 40
    assert np.median([r["score"] for r in res_a]) > np.max(sorted(r["score"] for r in res_n)[:-5])
    assert np.mean([r["percentile"] for r in res_a]) > 95


def test_results_come_back_in_request_order(client: InProcess, bundle_dir: Path) -> None:
    df = pd.concat([generate_payments(20, seed=32), make_anomalies(20, seed=32)])
    df = df.sample(frac=1.0, random_state=1).reset_index(drop=True)
    r = client.post("/v1/score", json={"records": records(df)})
    assert r.status_code == 200
    got = [x["score"] for x in r.json()["results"]]
    bundle, model = open_bundle(bundle_dir)
    feats = bundle.manifest.features
    expected = model.run(
        encode_columns(feats, {f.name: df[f.name].to_numpy() for f in feats}).inputs
    )["elbo"]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_attribution_names_the_driving_feature(client: InProcess) -> None:
    bad = records(make_anomalies(10, seed=33, kinds=("velocity",)))
    r = client.post("/v1/score", params={"explain": 1}, json={"records": bad})
    tops = [x["top_features"][0]["name"] for x in r.json()["results"]]
    assert tops.count("tx_last_24h") >= 9


def test_query_picks_score_type_and_explanations(client: InProcess, bundle_dir: Path) -> None:
    m = read_bundle(bundle_dir).manifest
    recs = records(make_anomalies(3, seed=34))
    r = client.post("/v1/score", params={"score": "recon", "explain": 0}, json={"records": recs})
    body = r.json()
    assert body["model"]["score_type"] == "recon"
    assert all(
        x["threshold"] == pytest.approx(m.thresholds["recon"].value) for x in body["results"]
    )
    assert all(x["top_features"] == [] for x in body["results"])
    r = client.post("/v1/score", params={"explain": 6}, json={"records": recs})
    assert max(len(x["top_features"]) for x in r.json()["results"]) > 3
    r = client.post("/v1/score", params={"score": "mahalanobis"}, json={"records": recs})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "score"


def test_unseen_category_is_scored_and_flagged(client: InProcess) -> None:
    rec = records(generate_payments(1, seed=35))[0]
    rec["merchant_category"] = "space_tourism"
    r = client.post("/v1/score", json={"records": [rec]})
    assert r.status_code == 200
    res = r.json()["results"][0]
    assert res["unknown_categories"] == ["merchant_category"]
    assert math.isfinite(res["score"])


def test_ignored_training_columns_are_accepted(client: InProcess, bundle_dir: Path) -> None:
    assert "transaction_id" in read_bundle(bundle_dir).manifest.ignored_columns
    rec = records(generate_payments(1, seed=36))[0]
    assert "transaction_id" in rec
    assert client.post("/v1/score", json={"records": [rec]}).status_code == 200


# ---------------------------------------------------------------- bad input


def _one() -> dict[str, Any]:
    return records(generate_payments(1, seed=37))[0]


BAD_RECORDS: dict[str, tuple[dict[str, Any], str, str]] = {
    # case: (changes to a good record, field named, reason)
    "wrong type": ({"amount": "twelve"}, "amount", "wrong_type"),
    "bool for number": ({"hour": True}, "hour", "wrong_type"),
    "text for boolean": ({"card_present": "perhaps"}, "card_present", "wrong_type"),
    "object for category": ({"country": {"a": 1}}, "country", "wrong_type"),
    "array for number": ({"amount": [1.0]}, "amount", "wrong_type"),
    "unknown field": ({"favourite_colour": "blue"}, "favourite_colour", "unknown_field"),
    "string too long": ({"country": "x" * 300}, "country", "too_long"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_names_index_field_and_reason(client: InProcess, case: str) -> None:
    change, field, reason = BAD_RECORDS[case]
    recs = [_one(), {**_one(), **change}]
    r = client.post("/v1/score", json={"records": recs})
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert {"record": 1, "field": field, "reason": reason} in [
        {k: e[k] for k in ("record", "field", "reason")} for e in errors
    ]
    assert all(e["record"] == 1 for e in errors)


def test_absent_required_field(client: InProcess) -> None:
    rec = _one()
    del rec["hour"]
    r = client.post("/v1/score", json={"records": [rec]})
    assert r.status_code == 422
    assert r.json()["errors"][0] == {
        "record": 0,
        "field": "hour",
        "reason": "missing",
        "message": r.json()["errors"][0]["message"],
    }


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(client: InProcess, token: str) -> None:
    rec = _one()
    text = json.dumps({"records": [rec]})
    text = text.replace(f'"amount": {json.dumps(rec["amount"])}', f'"amount": {token}')
    r = client.post("/v1/score", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "amount"
    assert r.json()["errors"][0]["reason"] == "not_finite"


@pytest.mark.parametrize(
    "body,status,field",
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (b"[1, 2]", 422, "records"),
        (b'{"records": {}}', 422, "records"),
        (b'{"records": []}', 422, "records"),
        (b'{"records": [1]}', 422, None),
        (b'{"records": [], "extra": 1}', 422, "extra"),
    ],
)
def test_malformed_bodies(client: InProcess, body: bytes, status: int, field: str | None) -> None:
    r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    j = r.json()
    assert j["error"]
    if status == 422:
        assert j["errors"][0]["field"] == field


def test_batch_too_large(client: InProcess) -> None:
    r = client.post("/v1/score", json={"records": [_one()] * (MAX_RECORDS + 1)})
    assert r.status_code == 422
    assert r.json()["errors"][0]["reason"] == "batch_too_large"


def test_body_over_the_limit_is_413(client: InProcess) -> None:
    big = {"records": [{**_one(), "country": "y" * 200}] * 400}
    r = client.post("/v1/score", json=big)
    assert r.status_code == 413
    # also when the client does not say how long the body is (chunked)
    chunks = iter([b'{"records": [', b"0," * (MAX_BODY // 2 + 10), b"0]}"])
    r = client.post("/v1/score", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_fuzzed_values_never_give_a_5xx(client: InProcess) -> None:
    weird: list[Any] = [
        None,
        True,
        False,
        0,
        -1,
        1e308,
        -1e308,
        2**70,
        "",
        "é" * 10,
        [],
        {},
        [1, 2],
        {"a": None},
        0.5,
        "NaN",
        "1e9",
    ]
    rec = _one()
    statuses = set()
    for field in rec:
        for w in weird:
            r = client.post("/v1/score", json={"records": [{**rec, field: w}]})
            statuses.add(r.status_code)
            assert r.status_code < 500, (field, w, r.text)
    assert statuses == {200, 422}


# ---------------------------------------------------------------- model, health, openapi


def test_model_health_and_request_id(client: InProcess, bundle_dir: Path) -> None:
    m = read_bundle(bundle_dir).manifest
    info = client.get("/v1/model").json()
    assert info["name"] == m.name and info["version"] == m.version
    assert info["score_types"] == m.score_types
    assert info["thresholds"]["elbo"]["value"] == pytest.approx(m.thresholds["elbo"].value)
    lo, hi = info["thresholds"]["elbo"]["fpr_interval"]  # how precise the threshold is
    assert lo < m.target_fpr < hi
    assert [f["name"] for f in info["features"]] == [f.name for f in m.features]
    assert "validation_loss" in info["metrics"] and info["created_at"]
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["version"] == m.version
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(generated) == 3 and "abc-123" not in generated  # a fresh one each time
    hostile = "id-" + "x" * 200  # too long to log or echo: replaced by a fresh one
    fresh = client.get("/healthz", headers={"X-Request-ID": hostile}).headers["x-request-id"]
    assert fresh not in generated and "x" * 20 not in fresh and len(fresh) < 40


def test_openapi_shows_the_models_fields(client: InProcess) -> None:
    spec = client.get("/openapi.json").json()
    comps = spec["components"]["schemas"]
    rec = comps["Record"]
    props = rec["properties"]
    assert {
        "type": "number",
        "minimum": -1.7976931348623157e308,
        "maximum": 1.7976931348623157e308,
    } in props["amount"]["anyOf"]
    assert {"type": "boolean"} in props["card_present"]["anyOf"]  # (or 0 / 1)
    assert {"type": "string", "maxLength": 256} in props["merchant_category"]["anyOf"]
    assert props["transaction_id"]["description"].startswith("accepted and ignored")
    assert rec["additionalProperties"] is False
    assert "'grocery'" in props["merchant_category"]["description"]
    assert {"amount", "hour", "merchant_category"} <= set(rec["required"])
    assert "customer_age" not in rec["required"]
    body = spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"] == "#/components/schemas/ScoreRequest"
    assert client.get("/docs").status_code == 200


# ---------------------------------------------------------------- Open Inference Protocol (V2)


def v2_request(df: pd.DataFrame, m_features: list[Any]) -> dict[str, Any]:
    inputs = []
    for f in m_features:
        col = df[f.name]
        if f.kind == "numeric":
            data = [None if math.isnan(v) else float(v) for v in col]
            dt = "FP64"
        elif f.kind == "boolean":
            data, dt = [bool(v) for v in col], "BOOL"
        else:
            data, dt = [None if pd.isna(v) else str(v) for v in col], "BYTES"
        inputs.append({"name": f.name, "shape": [len(df)], "datatype": dt, "data": data})
    return {
        "id": "req-7",
        "parameters": {"score_type": "iwae"},
        "inputs": inputs,
        "outputs": [{"name": "score"}, {"name": "is_anomaly"}],
    }


def test_v2_health_and_metadata(client: InProcess, bundle_dir: Path) -> None:
    m = read_bundle(bundle_dir).manifest
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get(f"/v2/models/{m.name}/ready").status_code == 200
    assert client.get(f"/v2/models/{m.name}/versions/{m.version}/ready").status_code == 200
    meta = client.get(f"/v2/models/{m.name}").json()
    assert meta["name"] == m.name and meta["versions"] == [m.version]
    types = {i["name"]: i["datatype"] for i in meta["inputs"]}
    assert types["amount"] == "FP64" and types["card_present"] == "BOOL"
    assert types["merchant_category"] == "BYTES"
    assert all(i["shape"] == [-1] for i in meta["inputs"])
    assert [o["name"] for o in meta["outputs"]] == ["score", "is_anomaly", "percentile"]
    server_meta = client.get("/v2").json()
    assert server_meta["name"] == "vae-anomaly" and "extensions" in server_meta
    r = client.get("/v2/models/nope")
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_v2_infer_matches_native(client: InProcess, bundle_dir: Path) -> None:
    m = read_bundle(bundle_dir).manifest
    df = pd.concat([generate_payments(5, seed=38), make_anomalies(5, seed=38)], ignore_index=True)
    r = client.post(f"/v2/models/{m.name}/infer", json=v2_request(df, m.features))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-7" and body["model_name"] == m.name
    assert body["model_version"] == m.version
    assert [o["name"] for o in body["outputs"]] == ["score", "is_anomaly"]
    out = {o["name"]: o for o in body["outputs"]}
    assert out["score"]["shape"] == [10] and out["score"]["datatype"] == "FP64"
    assert out["is_anomaly"]["datatype"] == "BOOL"
    native = client.post(
        "/v1/score", params={"score": "iwae"}, json={"records": records(df)}
    ).json()["results"]
    np.testing.assert_allclose(out["score"]["data"], [x["score"] for x in native], rtol=1e-6)
    assert out["is_anomaly"]["data"] == [x["is_anomaly"] for x in native]
    # versioned path, nested [N, 1] data, all outputs by default
    req = v2_request(df, m.features)
    del req["outputs"], req["id"]
    req["inputs"][0]["shape"] = [10, 1]
    req["inputs"][0]["data"] = [[v] for v in req["inputs"][0]["data"]]
    r = client.post(f"/v2/models/{m.name}/versions/{m.version}/infer", json=req)
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["score", "is_anomaly", "percentile"]
    assert "id" not in r.json()


@pytest.mark.parametrize(
    "change",
    [
        "datatype",
        "shape",
        "length",
        "null",
        "unknown",
        "missing",
        "output",
        "score_type",
        "not_object",
    ],
)
def test_v2_errors_use_the_protocol_body(client: InProcess, bundle_dir: Path, change: str) -> None:
    m = read_bundle(bundle_dir).manifest
    req: Any = v2_request(generate_payments(3, seed=39), m.features)
    inp = req["inputs"]
    if change == "datatype":
        inp[0]["datatype"] = "BYTES"
    elif change == "shape":
        inp[0]["shape"] = [3, 2]
    elif change == "length":
        inp[0]["data"] = inp[0]["data"][:2]
    elif change == "null":
        inp[0]["data"][1] = {}  # not a value (a null is: scored and named, tests/test_values.py)
    elif change == "unknown":
        inp.append({"name": "colour", "shape": [3], "datatype": "BYTES", "data": ["a"] * 3})
    elif change == "missing":
        req["inputs"] = inp[1:]
    elif change == "output":
        req["outputs"] = [{"name": "logits"}]
    elif change == "score_type":
        req["parameters"] = {"score_type": "nope"}
    else:
        req = [1, 2, 3]
    r = client.post(f"/v2/models/{m.name}/infer", json=req)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and r.json()["error"]


# ---------------------------------------------------------------- metrics


def test_metrics_move_by_the_right_amounts(client: InProcess, bundle_dir: Path) -> None:
    m = read_bundle(bundle_dir).manifest
    before = metric_samples(client)
    recs = records(pd.concat([generate_payments(7, seed=40), make_anomalies(5, seed=40)]))
    recs[0]["merchant_category"] = "never_seen"
    r = client.post("/v1/score", json={"records": recs})
    flagged = sum(x["is_anomaly"] for x in r.json()["results"])
    client.post("/v1/score", json={"records": [{**recs[1], "amount": "x"}]})
    client.get(f"/v2/models/{m.name}/ready")
    client.get("/some/random/path/123")
    after = metric_samples(client)

    def delta(metric: str, /, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert delta("vae_anomaly_records_scored_total") == 12
    assert delta("vae_anomaly_anomalies_total") == flagged >= 4
    assert delta("vae_anomaly_score_count") == 12
    assert delta("vae_anomaly_batch_size_count") == 1
    assert delta("vae_anomaly_batch_size_sum") == 12
    assert delta("vae_anomaly_inference_seconds_count") == 1
    unknown = [name for x in r.json()["results"] for name in x["unknown_categories"]]
    assert unknown.count("merchant_category") == 2  # "never_seen" and a new_merchant anomaly
    for name in ("merchant_category", "country"):
        assert delta("vae_anomaly_unknown_category_total", feature=name) == unknown.count(name)
    assert delta("vae_anomaly_invalid_records_total", reason="wrong_type") == 1
    assert (
        delta("vae_anomaly_http_requests_total", method="POST", route="/v1/score", status="200")
        == 1
    )
    assert (
        delta("vae_anomaly_http_requests_total", method="POST", route="/v1/score", status="422")
        == 1
    )
    # routes are labelled by template, never by raw path
    assert (
        delta(
            "vae_anomaly_http_requests_total",
            method="GET",
            route="/v2/models/{name}/ready",
            status="200",
        )
        == 1
    )
    assert (
        delta("vae_anomaly_http_requests_total", method="GET", route="unmatched", status="404") == 1
    )
    routes = {dict(k[1]).get("route") for k in after if k[0] == "vae_anomaly_http_requests_total"}
    assert not any(r and m.name in r for r in routes)
    assert delta("vae_anomaly_http_request_duration_seconds_count", route="/v1/score") == 2


# ---------------------------------------------------------------- hostile bodies, queries


def test_deep_nesting_is_refused_cleanly(defaults: InProcess, bundle_dir: Path) -> None:
    name = read_bundle(bundle_dir).manifest.name
    rec = records(generate_payments(1, seed=72))[0]
    for depth in (2_000, 200_000):
        deep = b"[" * depth + b"]" * depth
        for path in ("/v1/score", f"/v2/models/{name}/infer"):
            r = defaults.post(path, content=deep, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, depth, r.text)
            assert "not valid JSON" in r.json()["error"]
    # nesting inside a record's field: the field is named, the request refused
    nested: Any = 1.0
    for _ in range(500):
        nested = [nested]
    bad = dict(rec, amount=nested)
    r = defaults.post("/v1/score", json={"records": [bad]})
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "amount"
    assert r.json()["errors"][0]["reason"] == "wrong_type"
    # a tensor whose data nests deeper than its shape allows
    body = v2_body(bundle_dir, rec)
    body["inputs"][0]["data"] = nested
    r = defaults.post(f"/v2/models/{name}/infer", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert defaults.get("/readyz").status_code == 200


def test_numbers_beyond_float_are_flagged_and_odd_tensor_data_is_4xx(
    defaults: InProcess, bundle_dir: Path
) -> None:
    name = read_bundle(bundle_dir).manifest.name
    rec = records(generate_payments(1, seed=73))[0]
    # an integer of 401 digits: valid JSON, beyond any float, and a number all the same
    text = json.dumps({"records": [dict(rec, amount="BIG")]}).replace('"BIG"', "1" + "0" * 400)
    r = defaults.post("/v1/score", content=text, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["is_anomaly"]
    assert [(u["field"], u["kind"]) for u in result["unusual_values"]] == [
        ("amount", "out_of_range")
    ]
    body = v2_body(bundle_dir, rec)
    for data in (5, "abc", {"a": 1}, None):
        body["inputs"][0]["data"] = data
        text = json.dumps(body).replace('"BIG"', "1" + "0" * 400)
        r = defaults.post(
            f"/v2/models/{name}/infer",
            content=text,
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 400, (data, r.text)


def test_query_parameters_are_checked(defaults: InProcess) -> None:
    recs = records(generate_payments(2, seed=74))
    for params, field in (
        ({"explain": "abc"}, "explain"),
        ({"explain": "1001"}, "explain"),
        ({"explain": "-1"}, "explain"),
        ({"score": "mahalanobis"}, "score"),
    ):
        r = defaults.post("/v1/score", params=params, json={"records": recs})
        assert r.status_code == 422, (params, r.text)
        assert [e["field"] for e in r.json()["errors"]] == [field]
    r = defaults.post("/v1/score", params={"explain": "2", "score": "iwae"}, json={"records": recs})
    assert r.status_code == 200
    assert r.json()["model"]["score_type"] == "iwae"
    assert all(len(x["top_features"]) <= 2 for x in r.json()["results"])


def test_fast_and_careful_validation_agree(defaults: InProcess, bundle_dir: Path) -> None:
    """Records that take the fast path (plain values) and the same records written so that
    take the careful path (booleans as 0/1, a missing value left out instead of null) get the
    same scores, one by one and in a batch."""
    m = read_bundle(bundle_dir).manifest
    plain = records(generate_payments(20, seed=75))
    bools = [f.name for f in m.features if f.kind == "boolean"]
    nullable = [f.name for f in m.features if f.nullable]
    assert bools, "the test bundle has boolean features"
    careful = []
    for rec in plain:
        rec2 = dict(rec)
        for b in bools:
            rec2[b] = int(rec[b])
        for k in nullable:
            if rec2.get(k) is None:
                rec2.pop(k, None)
        careful.append(rec2)
    a = defaults.post("/v1/score", json={"records": plain}).json()["results"]
    b = defaults.post("/v1/score", json={"records": careful}).json()["results"]
    one = [defaults.post("/v1/score", json={"records": [r]}).json()["results"][0] for r in careful]
    assert [x["score"] for x in a] == [x["score"] for x in b]
    assert [x["score"] for x in one] == pytest.approx([x["score"] for x in a], rel=1e-5)
    assert [x["top_features"] for x in a] == [x["top_features"] for x in b]


# ---------------------------------------------------------------- API keys


def test_metrics_and_docs_need_a_key_when_protected(keyed: InProcess) -> None:
    for path in ("/metrics", "/openapi.json", "/docs"):
        assert keyed.get(path).status_code == 401, path
        assert keyed.get(path, headers={"Authorization": "Bearer nope"}).status_code == 403
        assert keyed.get(path, headers=AUTH).status_code == 200, path
    assert keyed.get("/redoc").status_code == 404
    assert "vae_anomaly_http_requests_total" in keyed.get("/metrics", headers=AUTH).text
    assert "ScoreRequest" in keyed.get("/openapi.json", headers=AUTH).text
    for path in ("/healthz", "/readyz", "/v2/health/ready"):
        assert keyed.get(path).status_code == 200, path
