"""Files and JSON that other real data holds (fast tier): a Parquet file with a column twice,
Parquet decimals, numbers beyond any float (``1e400``, integers of thousands of digits),
``NaN`` in a binary request's JSON part. Each is scored by the rules every entry point shares
(an extreme number flagged and named), or refused with a reason naming the column or the
field; never a crash, a traceback or a half-written output file."""

from __future__ import annotations

import decimal
import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from service.bundle import read_bundle
from service.cli import build_parser, main
from service.cpus import MAX_THREADS
from tests.conftest import InProcess, in_process, records, v2_body
from training.config import TrainConfig
from training.demo_data import generate_payments

HUGE = "9" * 5000  # an integer of 5,000 digits: valid JSON, beyond any float


@pytest.fixture(scope="module")
def client(bundle_dir: Path) -> Iterator[InProcess]:
    with in_process(bundle_dir) as c:
        yield c


def _score(bundle: Path, data: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["score", str(bundle), str(data), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return f"{code}:{err}"


def test_a_parquet_column_given_twice_is_refused_by_name(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = pa.Table.from_pandas(generate_payments(30, seed=320), preserve_index=False)
    twice = pa.Table.from_arrays(
        [*table.columns, table.column("amount")], names=[*table.column_names, "amount"]
    )
    pq.write_table(twice, tmp_path / "in.parquet")
    out = tmp_path / "out.csv"
    said = _score(bundle_dir, tmp_path / "in.parquet", out, capsys)
    assert said.startswith("2:error: ") and "['amount'] appear more than once" in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]  # nothing half-written


def test_parquet_decimals_are_numbers(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    df = generate_payments(40, seed=321)
    df.to_parquet(tmp_path / "floats.parquet", index=False)
    table = pa.Table.from_pandas(df, preserve_index=False)
    amounts = pa.array([decimal.Decimal(f"{v:.2f}") for v in df["amount"]], pa.decimal128(12, 2))
    table = table.set_column(table.column_names.index("amount"), "amount", amounts)
    pq.write_table(table, tmp_path / "decimals.parquet")
    for name in ("floats", "decimals"):
        said = _score(bundle_dir, tmp_path / f"{name}.parquet", tmp_path / f"{name}.csv", capsys)
        assert said.startswith("0:"), said
    floats, decimals = (pd.read_csv(tmp_path / f"{n}.csv") for n in ("floats", "decimals"))
    assert decimals["error"].isna().all(), decimals["error"].dropna().tolist()
    pd.testing.assert_series_equal(decimals["score"], floats["score"])


@pytest.mark.parametrize("number", [HUGE, "-" + HUGE, "1e400", "-2.5E+999"])
def test_a_number_beyond_any_float_is_scored_flagged_and_named(
    client: InProcess, bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    number: str,
) -> None:  # fmt: skip
    """Valid JSON, and a number: far out of any range the model saw, not invalid JSON (400)
    nor a refused value (422). ``Infinity`` is no number, and stays refused."""
    rec = records(generate_payments(1, seed=322))[0]
    text = json.dumps({"records": [dict(rec, amount="BIG")]}).replace('"BIG"', number)
    r = client.post("/v1/score", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    result = r.json()["results"][0]
    assert result["is_anomaly"] and result["percentile"] == 100.0
    assert [(u["field"], u["kind"]) for u in result["unusual_values"]] == [
        ("amount", "out_of_range")
    ]
    lines = json.dumps(dict(rec, amount="BIG")).replace('"BIG"', number) + "\n"
    lines += json.dumps(dict(rec, amount="BIG")).replace('"BIG"', "-Infinity") + "\n"
    (tmp_path / "in.jsonl").write_text(lines + json.dumps(rec) + "\n")
    said = _score(bundle_dir, tmp_path / "in.jsonl", tmp_path / "out.csv", capsys)
    assert said.startswith("0:"), said
    out = pd.read_csv(tmp_path / "out.csv")
    assert out["is_anomaly"].tolist()[0] and out["unusual"][0].startswith("amount="), out
    assert out["error"].tolist()[1] == "amount: must be a finite number", out
    assert pd.isna(out["error"][2])


def test_nan_in_a_binary_requests_json_part_is_named_as_in_json(
    client: InProcess, bundle_dir: Path
) -> None:
    df = generate_payments(1, seed=323).fillna({"device": "mobile", "distance_from_home_km": 1.0})
    body = v2_body(bundle_dir, records(df.fillna({"customer_age": 40}))[0])
    body["inputs"][0]["data"] = ["NAN"]
    head = json.dumps(body).replace('"NAN"', "NaN").encode()
    url = f"/v2/models/{read_bundle(bundle_dir).manifest.name}/infer"
    for headers in (
        {"content-type": "application/json"},
        {"inference-header-content-length": str(len(head))},
    ):
        r = client.post(url, content=head, headers=headers)
        assert r.status_code == 400, r.text
        assert "'amount'[0]" in r.json()["error"] and "finite" in r.json()["error"], r.text


@pytest.mark.parametrize(
    "argv",
    [
        ["score", "b", "d.csv", "--out", "o.csv", "--threads", "100000"],
        ["drift", "b", "d.csv", "--threads", "100000"],
    ],
)
def test_a_thread_count_past_any_machine_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """100,000 onnxruntime threads hung `score` (thread stacks until memory ran out)."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert f"--threads: must be at most {MAX_THREADS}, got 100000" in capsys.readouterr().err
    assert build_parser().parse_args([*argv[:-1], str(MAX_THREADS)]).threads == MAX_THREADS


def test_a_training_thread_count_past_any_machine_is_refused() -> None:
    """100,000 torch threads crashed `train` (a thread's stack could not be mapped)."""
    with pytest.raises(ValidationError, match="threads"):
        TrainConfig(threads=100_000)
    assert TrainConfig(threads=MAX_THREADS).threads == MAX_THREADS
