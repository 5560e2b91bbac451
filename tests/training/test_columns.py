"""Date-time and id-like columns: recognised in training, time features derived the same way by
the service, the V2 endpoint and bulk scoring, every column's fate reported."""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from service.bundle import DateTimeColumn, Manifest, client_fields, read_bundle
from service.cli import main
from service.sink import SCORED_BY, VERDICT
from service.timefeatures import derive
from tests.conftest import SCORED_COLUMNS, InProcess, in_process, run_cli
from training.config import ColumnConfig, TrainConfig, load_config
from training.data import DataError, prepare, read_table
from training.retrain import _scores

ROWS = 2000
START = pd.Timestamp("2024-05-06")  # a Monday
TIME_FEATURES = ["hour_sin", "hour_cos", "dow_sin", "dow_cos"]
CONFIG = """
epochs = 40
[columns.sent_ms]
type = "datetime"
unit = "epoch_ms"
"""


def telemetry(n: int, seed: int) -> pd.DataFrame:
    """Server telemetry, logged in day time only (8:00-18:00 as written): ISO timestamps with
    and without offsets, the same moment in epoch milliseconds, 150 hosts, request ids, a
    region, and measurements (cpu follows the time of day)."""
    rng = np.random.default_rng(seed)
    hour = rng.uniform(8, 18, n)
    wall = (
        START
        + pd.to_timedelta(rng.integers(0, 14, n), unit="D")
        + pd.to_timedelta(np.round(hour * 3600), unit="s")
    )
    suffix = rng.choice(["", "Z", "+02:00", "-05:00", "+05:30"], n)
    iso = [
        (w.isoformat(sep=" ") if i % 7 == 0 else w.isoformat()) + s
        for i, (w, s) in enumerate(zip(wall, suffix, strict=True))
    ]
    epoch_ms = (wall - pd.Timestamp("1970-01-01")) // pd.Timedelta(milliseconds=1)
    return pd.DataFrame(
        {
            "timestamp": iso,
            "host": [f"host-{h:03d}" for h in rng.integers(0, 150, n)],
            "request_id": [f"req-{v:012x}" for v in rng.integers(0, 2**47, n)],
            "region": rng.choice(["eu-west", "eu-north", "us-east", "ap-south"], n),
            "sent_ms": np.asarray(epoch_ms) + rng.integers(0, 500, n),
            "cpu": np.round(20 + 40 * np.sin(np.pi * (hour - 8) / 10) + rng.normal(0, 4, n), 2),
            "latency_ms": np.round(rng.lognormal(3, 0.4, n), 3),
            "bytes_out": rng.integers(1_000, 50_000_000, n),
        }
    )


@dataclass
class Trained:
    folder: Path
    bundle: Path
    manifest: Manifest
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    d = tmp_path_factory.mktemp("telemetry")
    telemetry(ROWS, seed=0).to_csv(d / "telemetry.csv", index=False)
    (d / "train.toml").write_text(CONFIG)
    out, err = io.StringIO(), io.StringIO()
    args = ["train", str(d / "telemetry.csv"), "--out", str(d / "bundle"), "--quiet"]
    with redirect_stdout(out), redirect_stderr(err):
        code = main([*args, "--config", str(d / "train.toml")])
    assert code == 0, err.getvalue()
    bundle = d / "bundle"
    return Trained(d, bundle, read_bundle(bundle).manifest, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def client(trained: Trained) -> Iterator[InProcess]:
    with in_process(trained.bundle, sink_dir=trained.folder / "sink") as c:
        yield c


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
        for r in df.to_dict("records")
    ]


# ---------------------------------------------------------------- the time features


def test_time_features_are_the_clock_on_a_circle() -> None:
    iso = DateTimeColumn(name="t", unit="iso", nullable=True, derived=TIME_FEATURES)
    utc = iso.model_copy(update={"timezone": "utc"})
    ms = iso.model_copy(update={"unit": "epoch_ms"})
    values = ["2024-05-06T09:30:00", "2024-05-06 09:30:00Z", "2024-05-06T11:30:00+02:00", None]
    local, _ = derive(values, iso)
    converted, _ = derive(values, utc)
    epoch, _ = derive([1714987800000, 1714987800000.0, None], ms)  # 2024-05-06T09:30Z
    day = 2 * math.pi * 9.5 / 24
    week = 2 * math.pi * (0 + 9.5 / 24) / 7  # a Monday
    for got, rows in ((local, [0, 1]), (converted, [0, 1, 2]), (epoch, [0, 1])):
        np.testing.assert_allclose(got["t.hour_sin"][rows], math.sin(day), atol=1e-12)
        np.testing.assert_allclose(got["t.hour_cos"][rows], math.cos(day), atol=1e-12)
        np.testing.assert_allclose(got["t.dow_sin"][rows], math.sin(week), atol=1e-12)
        np.testing.assert_allclose(got["t.dow_cos"][rows], math.cos(week), atol=1e-12)
    assert local["t.hour_sin"][2] == pytest.approx(math.sin(2 * math.pi * 11.5 / 24))
    assert np.isnan(local["t.hour_sin"][3]) and np.isnan(epoch["t.dow_cos"][2])
    # Sunday 23:59 and Monday 00:01 are neighbours; the week wraps around
    sun, mon = derive(["2024-05-12T23:59:00", "2024-05-13T00:01:00"], iso)[0]["t.dow_sin"]
    assert mon - sun == pytest.approx(2 * math.sin(2 * math.pi / (7 * 24 * 60)), rel=1e-9)


def test_values_that_are_not_date_times_are_named() -> None:
    iso = DateTimeColumn(name="t", unit="iso", nullable=True, derived=["hour_sin"])
    ms = iso.model_copy(update={"unit": "epoch_ms"})
    _, bad = derive(["2024-13-01T00:00:00", 1714987800, "yesterday", "9" * 100, True], iso)
    assert [(i, e.reason) for i, e in bad] == [
        (0, "not_a_datetime"),
        (1, "wrong_type"),
        (2, "not_a_datetime"),
        (3, "too_long"),
        (4, "wrong_type"),
    ]
    _, bad = derive(["1714987800", float("inf"), 10**400, False], ms)
    assert [e.reason for _, e in bad] == ["wrong_type", "not_finite", "not_finite", "wrong_type"]


# ---------------------------------------------------------------- training


def test_manifest_describes_the_columns(trained: Trained) -> None:
    m = trained.manifest
    assert [(c.name, c.unit, c.derived) for c in m.datetime_columns] == [
        ("timestamp", "iso", TIME_FEATURES),
        ("sent_ms", "epoch_ms", TIME_FEATURES),
    ]
    kinds = {f.name: f.kind for f in m.features}
    assert {k for k in kinds if "." in k} == {
        f"{c}.{d}" for c in ("timestamp", "sent_ms") for d in TIME_FEATURES
    }
    assert all(kinds[f"timestamp.{d}"] == "numeric" for d in TIME_FEATURES)
    assert kinds["region"] == "categorical"
    assert kinds["cpu"] == kinds["latency_ms"] == kinds["bytes_out"] == "numeric"
    assert "host" not in kinds and "request_id" not in kinds and "timestamp" not in kinds
    assert m.ignored_columns == ["host", "request_id"]
    report = {c.name: c for c in m.columns}
    assert list(report) == list(telemetry(1, 0).columns)  # every column, in order
    assert (report["host"].type, report["host"].used) == ("id", False)
    assert "150 distinct values" in report["host"].reason
    assert (report["request_id"].type, report["request_id"].used) == ("id", False)
    assert (report["timestamp"].type, report["timestamp"].used) == ("datetime", True)
    assert report["sent_ms"].transform.startswith("cyclical (epoch_ms")
    assert report["bytes_out"].used and report["region"].used


def test_summary_and_warnings_name_every_column(trained: Trained) -> None:
    warnings = [line for line in trained.stderr.splitlines() if line.startswith("warning:")]
    assert any("'host' looks like an id" in w for w in warnings), warnings
    assert any("'request_id' looks like an id" in w for w in warnings), warnings
    assert not any("rare value" in w for w in warnings), warnings  # no host folded to unknown
    lines = trained.stdout.splitlines()
    start = lines.index("columns: 6 of 8 used")
    table = {line.split()[0]: line.split(None, 3)[1:] for line in lines[start + 1 : start + 9]}
    assert table["host"][:2] == ["id", "left"] and "id-like" in table["host"][-1]
    assert table["timestamp"][:2] == ["datetime", "used"]
    assert "hour_sin, hour_cos, dow_sin, dow_cos" in table["sent_ms"][-1]
    assert table["region"][:2] == ["categorical", "used"]
    html = (trained.bundle / "report.html").read_text()
    section = html[html.index("<h2>Columns</h2>") :]
    for name in telemetry(1, 0).columns:
        assert f"<td>{name}</td>" in section
    assert "<td>host</td><td>no</td><td>id</td>" in section
    assert "<td>timestamp</td><td>yes</td><td>datetime</td>" in section


def frame(**columns: Any) -> pd.DataFrame:
    return pd.DataFrame(columns)


def test_ids_are_told_from_categories_and_measurements() -> None:
    rng = np.random.default_rng(3)
    n = 400
    tail = rng.choice(120, n, p=np.r_[np.full(90, 0.99 / 90), np.full(30, 0.01 / 30)])
    df = frame(
        seq=np.arange(1000, 1000 + n)[rng.permutation(n)],  # a shuffled sequence number
        order_no=np.arange(n) * 3,  # in file order
        bytes=rng.integers(0, 10**9, n),  # unique, but a measurement
        count=rng.poisson(3, n),
        price=rng.normal(100, 20, n).round(4),  # floats are measurements
        uuid=[f"{v:032x}" for v in rng.integers(0, 2**62, n)],
        shop=[f"shop-{v}" for v in tail],  # 120 values, the cap keeps 99% of the records
        host=[f"h{v}" for v in rng.integers(0, 150, n)],  # the cap would fold a third
        colour=rng.choice(["red", "green", "blue"], n),
    )
    p = prepare(df, TrainConfig(max_categories=100))
    assert p.ignored == ["seq", "order_no", "uuid", "host"]
    assert {f.name for f in p.features} == {"bytes", "count", "price", "shop", "colour"}
    kept = prepare(df, TrainConfig(columns={"host": ColumnConfig(type="categorical")}))
    assert kept.ignored == ["seq", "order_no", "uuid"]  # the config wins
    assert any("'host': " in w and "rare value(s)" in w for w in kept.warnings)


def test_datetime_drop_and_bad_values_in_a_configured_column() -> None:
    df = telemetry(300, seed=1)
    drop = {"timestamp": ColumnConfig(transform="drop"), "sent_ms": ColumnConfig(type="numeric")}
    p = prepare(df, TrainConfig(columns=drop))
    assert not p.datetimes and "timestamp" in p.ignored
    assert not any(f.name.startswith("timestamp") for f in p.features)
    report = {c.name: c for c in p.report}
    assert (report["timestamp"].used, report["timestamp"].transform) == (False, "drop")
    assert "sent_ms" in {f.name for f in p.features}  # an explicit type wins over recognition
    df.loc[17, "timestamp"] = "2024-05-06T25:00:00"
    with pytest.raises(DataError, match=r"'timestamp'.*25:00.*row 17"):
        prepare(df, TrainConfig(columns={"timestamp": ColumnConfig(type="datetime")}))
    # not recognised (one value is not a date-time): a high-cardinality string, an id
    assert "timestamp" in prepare(df, TrainConfig()).ignored


def test_missing_date_times_are_modelled_as_missing() -> None:
    df = telemetry(300, seed=4)
    df.loc[::10, "timestamp"] = None
    p = prepare(df, TrainConfig(columns={"sent_ms": ColumnConfig(unit="epoch_ms")}))
    assert [(c.name, c.nullable) for c in p.datetimes] == [("timestamp", True), ("sent_ms", False)]
    time_features = [f for f in p.features if f.name.startswith("timestamp.")]
    assert len(time_features) == 4 and all(f.nullable for f in time_features)


def test_json_lines_are_read_as_written(tmp_path: Path) -> None:
    """pandas would turn numbers in a column named like a date into timestamps: then training
    would expect ISO strings where clients send epoch numbers."""
    df = telemetry(300, seed=2).rename(columns={"sent_ms": "created_at"})
    df.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    read = read_table(tmp_path / "t.jsonl")
    assert read["created_at"].tolist() == df["created_at"].tolist()
    assert read["timestamp"].tolist() == df["timestamp"].tolist()
    p = prepare(read, TrainConfig(columns={"created_at": ColumnConfig(unit="epoch_ms")}))
    assert [(c.name, c.unit) for c in p.datetimes] == [
        ("timestamp", "iso"),
        ("created_at", "epoch_ms"),
    ]


@pytest.mark.parametrize(
    "settings,message",
    [
        ('[columns.t]\ntype = "numeric"\nunit = "epoch_ms"', "column 't': unit and timezone"),
        ('[columns.t]\ntype = "numeric"\ntransform = "cyclical"', "column 't': transform"),
        ('[columns.t]\ntype = "datetime"\ntransform = "log"', "column 't': transform"),
        ('[columns.t]\nunit = "epoch_us"', "column 't': unit must be"),
        ('[columns.t]\ntimezone = "CET"', "column 't': timezone must be"),
        ('[columns.t]\nformat = "%Y"', "column 't': a table of settings"),
        ("id_distinct_share = 0", "id_distinct_share must be in"),
    ],
)
def test_config_errors_name_the_column(tmp_path: Path, settings: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(settings)
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_schema_change_covers_datetime_fields(trained: Trained) -> None:
    fields = client_fields(trained.manifest)
    assert fields["timestamp"] == ("datetime iso", False)
    assert not any(name.startswith("timestamp.") for name in fields)


# ---------------------------------------------------------------- the service and bulk scoring


@pytest.mark.slow  # the real `vae-anomaly score`
def test_service_and_bulk_cli_score_raw_timestamps_alike(
    trained: Trained, client: InProcess
) -> None:
    df = telemetry(40, seed=5)
    r = client.post("/v1/score", json={"records": records(df)})
    assert r.status_code == 200, r.text
    native = [x["score"] for x in r.json()["results"]]
    data, out = trained.folder / "new.csv", trained.folder / "scored.csv"
    df.to_csv(data, index=False)
    done = run_cli("score", trained.bundle, data, "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    bulk = pd.read_csv(out)
    assert list(bulk.columns) == ["host", "request_id", *SCORED_COLUMNS]
    assert bulk["request_id"].tolist() == df["request_id"].tolist()
    np.testing.assert_allclose(bulk["score"], native, rtol=1e-5)
    gate = _scores(read_bundle(trained.bundle), pd.read_csv(data))  # retrain's promotion gate
    assert gate is not None
    np.testing.assert_allclose(gate, native, rtol=1e-5)
    v2 = client.post(
        f"/v2/models/{trained.manifest.name}/infer",
        json={
            "inputs": [
                {"name": c, "shape": [len(df)], "datatype": dt, "data": df[c].tolist()}
                for c, dt in (
                    ("timestamp", "BYTES"),
                    ("sent_ms", "INT64"),
                    ("region", "BYTES"),
                    ("cpu", "FP64"),
                    ("latency_ms", "FP64"),
                    ("bytes_out", "INT64"),
                )
            ]
        },
    )
    assert v2.status_code == 200, v2.text
    np.testing.assert_allclose(v2.json()["outputs"][0]["data"], native, rtol=1e-5)


def test_night_time_scores_higher_than_day_time(trained: Trained, client: InProcess) -> None:
    day = telemetry(20, seed=6)
    night = day.copy()
    at_three = pd.to_datetime(day["sent_ms"], unit="ms").dt.normalize() + pd.Timedelta(hours=3)
    night["timestamp"] = at_three.dt.strftime("%Y-%m-%dT%H:%M:%S")
    night["sent_ms"] = (at_three - pd.Timestamp("1970-01-01")) // pd.Timedelta(milliseconds=1)
    scores = {}
    for label, df in (("day", day), ("night", night)):
        r = client.post("/v1/score?explain=2", json={"records": records(df)})
        assert r.status_code == 200, r.text
        scores[label] = r.json()["results"]
    higher = [n["score"] > d["score"] for d, n in zip(scores["day"], scores["night"], strict=True)]
    assert all(higher)
    tops = [t["name"] for n in scores["night"] for t in n["top_features"]]
    assert sum(t.split(".")[0] in ("timestamp", "sent_ms") for t in tops) >= len(day)


@pytest.mark.parametrize(
    "field,value,reason",
    [
        ("timestamp", "2024-02-30T10:00:00", "not_a_datetime"),
        ("timestamp", "half past nine", "not_a_datetime"),
        ("timestamp", 1714987800, "wrong_type"),
        ("sent_ms", "1714987800000", "wrong_type"),
        ("sent_ms", float("inf"), "not_finite"),
    ],
)
def test_bad_date_time_is_a_422_naming_the_field(
    client: InProcess, field: str, value: Any, reason: str
) -> None:
    recs = records(telemetry(3, seed=7))
    recs[1][field] = value
    body = json.dumps({"records": recs}, allow_nan=True)
    r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"] == [
        {"record": 1, "field": field, "reason": reason, "message": r.json()["errors"][0]["message"]}
    ]
    assert r.json()["error"].startswith("1 of 3 records")


def test_a_null_date_time_is_scored_and_named_as_unusual(client: InProcess) -> None:
    recs = records(telemetry(3, seed=7))
    recs[1]["timestamp"] = None  # never missing in training: unusual, never refused
    r = client.post("/v1/score", json={"records": recs})
    assert r.status_code == 200, r.text
    result = r.json()["results"][1]
    assert result["is_anomaly"]
    assert {u["field"].split(".")[0] for u in result["unusual_values"]} == {"timestamp"}


def test_left_out_timestamp_and_v2_errors_name_the_field(
    trained: Trained, client: InProcess
) -> None:
    recs = records(telemetry(2, seed=8))
    del recs[0]["timestamp"]
    r = client.post("/v1/score", json={"records": recs})
    assert r.status_code == 422
    assert [(e["record"], e["field"], e["reason"]) for e in r.json()["errors"]] == [
        (0, "timestamp", "missing")
    ]
    df = telemetry(2, seed=8)
    inputs = [
        {"name": "timestamp", "shape": [2], "datatype": "BYTES", "data": ["2024-05-06T10:00", "x"]},
        {"name": "sent_ms", "shape": [2], "datatype": "INT64", "data": df["sent_ms"].tolist()},
        {"name": "region", "shape": [2], "datatype": "BYTES", "data": ["eu-west", "eu-west"]},
        {"name": "cpu", "shape": [2], "datatype": "FP64", "data": [40.0, 41.0]},
        {"name": "latency_ms", "shape": [2], "datatype": "FP64", "data": [20.0, 21.0]},
        {"name": "bytes_out", "shape": [2], "datatype": "INT64", "data": [5000, 6000]},
    ]
    url = f"/v2/models/{trained.manifest.name}/infer"
    r = client.post(url, json={"inputs": inputs})
    assert r.status_code == 400 and "'timestamp'[1]" in r.json()["error"], r.text
    inputs[0]["data"] = ["2024-05-06T10:00", "2024-05-06T10:01:30.250+01:00"]
    assert client.post(url, json={"inputs": inputs}).status_code == 200
    inputs[1]["datatype"] = "BYTES"
    r = client.post(url, json={"inputs": inputs})
    assert r.status_code == 400 and "'sent_ms'" in r.json()["error"], r.text


def test_metadata_and_schema_show_the_raw_fields(trained: Trained, client: InProcess) -> None:
    meta = client.get(f"/v2/models/{trained.manifest.name}").json()
    inputs = {i["name"]: i["datatype"] for i in meta["inputs"]}
    assert inputs["timestamp"] == "BYTES" and inputs["sent_ms"] == "FP64"
    assert not any("." in name for name in inputs)
    record = client.get("/openapi.json").json()["components"]["schemas"]["Record"]
    assert {"timestamp", "sent_ms", "host", "request_id"} <= set(record["properties"])
    assert "timestamp" in record["required"]
    assert not any("." in name for name in record["properties"])
    info = client.get("/v1/model").json()
    assert [c["name"] for c in info["datetime_columns"]] == ["timestamp", "sent_ms"]


def test_sink_keeps_the_raw_timestamp(trained: Trained, client: InProcess) -> None:
    df = telemetry(30, seed=9)
    assert client.post("/v1/score", json={"records": records(df)}).status_code == 200
    sent = set(df["timestamp"])
    deadline = time.monotonic() + 10
    lines: list[dict[str, Any]] = []
    while not sent & {r["timestamp"] for r in lines} and time.monotonic() < deadline:
        time.sleep(0.1)
        lines = [
            json.loads(line)
            for p in (trained.folder / "sink").glob("*.jsonl")
            for line in p.read_text().splitlines()
        ]
    assert sent & {r["timestamp"] for r in lines}
    fields = {"timestamp", "sent_ms", "region", "cpu", "latency_ms", "bytes_out"}
    ids, verdicts = {"host", "request_id"}, {VERDICT, SCORED_BY}
    # every line: the raw fields and the verdict, never the time features; the id columns
    # where the request carried them (the native API's records do, V2 tensors do not)
    assert all(fields | verdicts <= set(r) <= fields | verdicts | ids for r in lines)
    assert all(ids <= set(r) for r in lines if r["timestamp"] in sent)
