"""Scoring with Spark (a real pyspark in local[2] mode, Java 17) against the bulk CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.api import Model, SchemaError
from tests.conftest import cli_executable
from training.demo_data import generate_payments, make_anomalies

pyspark = pytest.importorskip("pyspark")
from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql.functions import lit  # noqa: E402

SPARK_ENV = {"PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkSession]:
    os.environ.update(SPARK_ENV)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("vae-anomaly tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.host", "127.0.0.1")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two Parquet files of payments with anomalies and missing values (a partitioned set)."""
    root = tmp_path_factory.mktemp("lake")
    df = pd.concat([generate_payments(1500, seed=21), make_anomalies(60, seed=21)])
    df = df.drop(columns=["anomaly_kind"]).reset_index(drop=True)
    df["transaction_id"] = [f"t{i:05d}" for i in range(len(df))]
    df.loc[df.index % 7 == 0, "customer_age"] = np.nan  # nulls in a nullable column
    df.iloc[:800].to_parquet(root / "part-0.parquet", index=False)
    df.iloc[800:].to_parquet(root / "part-1.parquet", index=False)
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **SPARK_ENV}
    return subprocess.run(
        [cli_executable(), *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_spark_scores_every_row_as_the_bulk_cli_does(
    bundle_dir: Path, lake: Path, tmp_path: Path
) -> None:
    whole = pd.concat([pd.read_parquet(p) for p in sorted(lake.glob("*.parquet"))])
    whole.to_parquet(tmp_path / "all.parquet", index=False)
    local = run_cli(
        "score", str(bundle_dir), str(tmp_path / "all.parquet"), "--out", str(tmp_path / "l.csv"),
        "--id-column", "transaction_id", "--quiet",
    )  # fmt: skip
    assert local.returncode == 0, local.stderr
    out = tmp_path / "spark-out"
    spark = run_cli(
        "score", str(bundle_dir), str(lake / "*.parquet"), "--out", str(out),
        "--engine", "spark", "--master", "local[2]",
    )  # fmt: skip
    assert spark.returncode == 0, spark.stderr
    assert f"scored {len(whole)} records with Spark" in spark.stdout
    a = pd.read_csv(tmp_path / "l.csv").set_index("transaction_id").sort_index()
    b = pd.read_parquet(out).set_index("transaction_id").sort_index()
    assert list(b.index) == list(a.index)  # every row once
    assert set(whole.columns) <= {*b.columns, "transaction_id"}  # the input columns are kept
    np.testing.assert_allclose(b["score"], a["score"], rtol=1e-5)
    assert (b["is_anomaly"] == a["is_anomaly"]).all()
    np.testing.assert_allclose(b["percentile"], a["percentile"], atol=1e-3)
    assert b["is_anomaly"].sum() > 0


def test_empty_partitions_and_the_python_api_agree(
    spark: SparkSession, bundle_dir: Path, lake: Path
) -> None:
    from service.spark import score_dataframe

    pdf = pd.read_parquet(lake / "part-0.parquet").head(30)
    df = spark.createDataFrame(pdf).repartition(8)  # 30 rows over 8 partitions; some empty
    df = df.union(spark.createDataFrame(pdf.head(0), schema=df.schema))
    got = score_dataframe(df, bundle_dir).toPandas().set_index("transaction_id").sort_index()
    want = Model.load(bundle_dir).score(pdf).set_index(pdf["transaction_id"]).sort_index()
    assert len(got) == 30
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-5)
    assert (got["is_anomaly"] == want["is_anomaly"]).all()


def test_a_wrong_schema_is_refused_on_the_driver(
    spark: SparkSession, bundle_dir: Path, lake: Path, tmp_path: Path
) -> None:
    from service.spark import score_dataframe

    df = spark.read.parquet(str(lake)).drop("amount")
    with pytest.raises(SchemaError, match="amount"):
        score_dataframe(df, bundle_dir)  # before any task: nothing is computed yet
    with pytest.raises(SchemaError, match="score"):
        score_dataframe(spark.read.parquet(str(lake)).withColumn("score", lit(1.0)), bundle_dir)
    bad = tmp_path / "no-amount.parquet"
    pd.read_parquet(lake / "part-0.parquet").drop(columns=["amount"]).to_parquet(bad)
    local = run_cli("score", str(bundle_dir), str(bad), "--out", str(tmp_path / "x.csv"))
    spark_cli = run_cli(
        "score", str(bundle_dir), str(bad), "--out", str(tmp_path / "x"), "--engine", "spark",
        "--master", "local[1]",
    )  # fmt: skip
    assert local.returncode == spark_cli.returncode == 2
    assert "amount" in local.stderr and "amount" in spark_cli.stderr
    assert not (tmp_path / "x").exists()
