"""Bulk scoring of files: `vae-anomaly score`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.bundle import read_bundle
from service.cli import main
from service.features import encode_columns
from service.runtime import open_bundle
from service.values import never_normal
from tests.conftest import SCORED_COLUMNS, run_cli
from training.demo_data import generate_payments, make_anomalies


def write(df: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)


def read(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_json(path, lines=True)


@pytest.mark.parametrize(
    "src,dst", [(".csv", ".parquet"), (".parquet", ".jsonl"), (".jsonl", ".csv")]
)
def test_scores_a_file_in_chunks_like_the_model(
    bundle_dir: Path, tmp_path: Path, src: str, dst: str, capsys: pytest.CaptureFixture[str]
) -> None:
    df = pd.concat(
        [generate_payments(2300, seed=100), make_anomalies(200, seed=100)], ignore_index=True
    ).drop(columns="anomaly_kind")
    data, out = tmp_path / f"in{src}", tmp_path / f"out{dst}"
    write(df, data)
    code = main(
        ["score", str(bundle_dir), str(data), "--out", str(out), "--chunk-size", "700", "--quiet"]
    )
    stdout = capsys.readouterr().out
    assert code == 0 and "scored 2500 records" in stdout
    got = read(out)
    assert list(got.columns) == ["transaction_id", *SCORED_COLUMNS]
    assert got["transaction_id"].tolist() == df["transaction_id"].tolist()
    bundle, model = open_bundle(bundle_dir)
    feats = bundle.manifest.features
    thr = bundle.manifest.thresholds["elbo"].value
    enc = encode_columns(feats, {f.name: df[f.name].to_numpy() for f in feats})
    # the model's scores, with rows holding a value never seen in training raised to the alarm
    expected = never_normal(model.run(enc.inputs)["elbo"].astype(np.float64), enc.unusual, thr)
    np.testing.assert_allclose(got["score"].to_numpy(), expected, rtol=1e-5)
    assert (got["is_anomaly"].to_numpy() == (expected > thr)).all()
    assert got["is_anomaly"].iloc[-200:].mean() > 0.8
    assert got["percentile"].between(0, 100).all()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow  # the real `vae-anomaly score`
def test_unreadable_values_are_reported_not_scored(bundle_dir: Path, tmp_path: Path) -> None:
    df = generate_payments(300, seed=101)
    df["customer_age"] = df["customer_age"].astype(object)
    df.loc[:9, "customer_age"] = "unknown"
    df = df.drop(columns=["device"])  # nullable: scored as missing
    data, out = tmp_path / "in.csv", tmp_path / "out.csv"
    write(df, data)
    r = run_cli(
        "score",
        str(bundle_dir),
        str(data),
        "--out",
        str(out),
        "--quiet",
        "--score",
        "iwae",
        "--id-column",
        "transaction_id",
        "hour",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "10 invalid record(s) not scored" in r.stderr
    assert "['device']" in r.stderr
    got = pd.read_csv(out)
    assert list(got.columns) == ["transaction_id", "hour", *SCORED_COLUMNS]
    assert len(got) == 300 and np.isfinite(got["score"][10:]).all()
    assert got["score"][:10].isna().all() and got["error"][:10].str.startswith("customer_age").all()


def test_bad_jobs_fail_cleanly(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    df = generate_payments(50, seed=102)
    data = tmp_path / "in.csv"
    write(df.drop(columns=["amount"]), data)
    out = tmp_path / "out.csv"
    assert main(["score", str(bundle_dir), str(data), "--out", str(out), "--quiet"]) == 2
    assert "amount" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]
    write(df, data)
    for argv, says in (
        (["--out", str(tmp_path / "o.xlsx")], "unknown file type"),
        (["--out", str(out), "--id-column", "nope"], "nope"),
    ):
        assert main(["score", str(bundle_dir), str(data), *argv, "--quiet"]) == 2
        assert says in capsys.readouterr().err
    assert main(["score", str(tmp_path), str(data), "--out", str(out), "--quiet"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_scores_with_a_registry_serving_version(bundle_dir: Path, tmp_path: Path) -> None:
    import shutil

    from service.registry import Registry

    reg = Registry(tmp_path / "reg", create=True)
    version = read_bundle(bundle_dir).manifest.version
    shutil.copytree(bundle_dir, reg.version_path(version))
    reg.promote(version)
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(generate_payments(100, seed=103), data)
    assert main(["score", str(reg.root), str(data), "--out", str(out), "--quiet"]) == 0
    assert len(read(out)) == 100


@pytest.mark.slow  # the real `vae-anomaly score`
def test_threads_follow_the_cpus_the_process_may_use(bundle_dir: Path, tmp_path: Path) -> None:
    """By default as many onnxruntime threads as usable CPUs (here: the affinity mask that
    `taskset` sets), not os.cpu_count(); --threads overrides."""
    from service.cpus import usable_cpus

    data, out = tmp_path / "in.csv", tmp_path / "out.csv"
    write(generate_payments(50, seed=104), data)
    base = ["score", str(bundle_dir), str(data), "--out", str(out), "--quiet"]
    for prefix, extra, threads in (
        ([], [], usable_cpus()),
        (["taskset", "-c", "0"], [], 1),
        (["taskset", "-c", "0"], ["--threads", "2"], 2),
    ):
        r = run_cli(*base, *extra, prefix=prefix, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"rows/s, {threads} thread(s))" in r.stdout, (prefix, extra, r.stdout)


def test_folders_and_globs_of_files_are_one_input(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    df = generate_payments(900, seed=7)
    lake = tmp_path / "lake"
    for i, day in enumerate(["day=1", "day=2", "day=3"]):
        (lake / day).mkdir(parents=True)
        df.iloc[i * 300 : (i + 1) * 300].to_parquet(lake / day / "part-0.parquet", index=False)
    (lake / "_SUCCESS").write_text("")  # Spark's marker: not data
    whole = tmp_path / "whole.parquet"
    df.to_parquet(whole, index=False)
    outs = {}
    for name, data in {
        "file": whole,
        "folder": lake,
        "glob": lake / "day=*" / "*.parquet",
    }.items():
        outs[name] = tmp_path / f"{name}.csv"
        assert main(["score", str(bundle_dir), str(data), "--out", str(outs[name]), "--quiet"]) == 0
        assert "scored 900 records" in capsys.readouterr().out
    want = pd.read_csv(outs["file"])
    for name in ("folder", "glob"):
        pd.testing.assert_frame_equal(pd.read_csv(outs[name]), want)
    (lake / "day=1" / "extra.csv").write_text("a\n1\n")
    assert main(["score", str(bundle_dir), str(lake), "--out", str(tmp_path / "x.csv")]) == 2
    assert "several formats" in capsys.readouterr().err
    assert (
        main(["score", str(bundle_dir), str(lake / "*.none"), "--out", str(tmp_path / "x.csv")])
        == 2
    )
    assert "no files" in capsys.readouterr().err


def test_explain_and_id_columns_pass_through_unchanged(bundle_dir: Path, tmp_path: Path) -> None:
    df = pd.concat(
        [generate_payments(50, seed=8), make_anomalies(10, seed=8)], ignore_index=True
    ).drop(columns="anomaly_kind")
    df["sent_at"] = [f"2026-11-28T10:{i:02d}:00Z" for i in range(len(df))]
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(df, data)
    code = main(
        ["score", str(bundle_dir), str(data), "--out", str(out), "--quiet", "--explain", "2",
         "--id-column", "transaction_id", "sent_at"]
    )  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sent_at"] for r in lines] == df["sent_at"].tolist()  # as written, not epoch ms
    assert [r["transaction_id"] for r in lines] == df["transaction_id"].tolist()
    names = {f.name for f in read_bundle(bundle_dir).manifest.features}
    tops = [r["top_features"] for r in lines]
    assert all(tops[-10:])  # every anomaly is explained
    for t in filter(None, tops):
        named = [part.split(":")[0] for part in t.split(", ")]
        assert 1 <= len(named) <= 2 and set(named) <= names
