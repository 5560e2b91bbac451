"""The `vae-anomaly train` command: formats, config, and bad training data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.bundle import read_bundle
from tests.conftest import run_cli, run_main
from training.demo_data import generate_payments

FAST = ["--epochs", "3", "--quiet", "--exclude", "transaction_id"]


@pytest.fixture(scope="module")
def small_df() -> pd.DataFrame:
    return generate_payments(400, seed=21)


@pytest.fixture
def small_csv(small_df: pd.DataFrame, tmp_path: Path) -> Path:
    data = tmp_path / "d.csv"
    small_df.to_csv(data, index=False)
    return data


@pytest.mark.slow  # the real `vae-anomaly` processes
def test_train_command_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "pay.csv"
    r = run_cli("sample-data", "--out", data, "--rows", "600", timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "bundle"
    r = run_cli(
        "train", data, "--out", out, *FAST, "--seed", "1", "--target-fpr", "0.05", "--score", "iwae"
    )
    assert r.returncode == 0, r.stderr
    assert f"bundle: {out}" in r.stdout
    assert "thresholds for a 0.05 false-positive rate" in r.stdout
    assert "false-positive rate at the iwae threshold" in r.stdout  # and how precise it is
    m = read_bundle(out).manifest
    assert m.default_score == "iwae" and m.target_fpr == 0.05 and m.name == "pay"
    assert m.config["seed"] == 1 and m.data.rows == 600


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
@pytest.mark.slow  # trains models
def test_each_file_format_trains(
    small_df: pd.DataFrame, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / f"d{suffix}"
    if suffix == ".csv":
        small_df.to_csv(data, index=False)
    elif suffix == ".parquet":
        small_df.to_parquet(data, index=False)
    else:
        small_df.to_json(data, orient="records", lines=True)
    code, _, err = run_main(capsys, "train", str(data), "--out", str(tmp_path / "b"), *FAST)
    assert code == 0, err
    kinds = {f.name: f.kind for f in read_bundle(tmp_path / "b").manifest.features}
    assert kinds == {
        "amount": "numeric",
        "hour": "numeric",
        "distance_from_home_km": "numeric",
        "customer_age": "numeric",
        "tx_last_24h": "numeric",
        "card_present": "boolean",
        "merchant_category": "categorical",
        "country": "categorical",
        "device": "categorical",
    }


@pytest.mark.slow  # trains models
def test_config_file_overrides_types_and_settings(
    small_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = small_csv
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'exclude = ["transaction_id"]\nlatent = 3\nhidden = [32]\nepochs = 2\n'
        '[columns.hour]\ntype = "categorical"\n[columns.amount]\ntransform = "none"\n'
    )
    code, _, err = run_main(
        capsys, "train", str(data), "--out", str(tmp_path / "b"), "--config", str(cfg), "--quiet"
    )
    assert code == 0, err
    m = read_bundle(tmp_path / "b").manifest
    feats = {f.name: f for f in m.features}
    assert feats["hour"].kind == "categorical"
    assert feats["amount"].transform == "none"  # type: ignore[union-attr]
    assert m.config["latent"] == 3 and m.config["hidden"] == [32] and m.config["epochs"] == 2

    (tmp_path / "bad.json").write_text(json.dumps({"latnet": 3}))
    code, _, err = run_main(
        capsys,
        "train",
        str(data),
        "--out",
        str(tmp_path / "b2"),
        "--config",
        str(tmp_path / "bad.json"),
    )
    assert code != 0 and "latnet" in err
    assert not (tmp_path / "b2").exists()


BAD_CASES = [
    "empty file",
    "header only",
    "one row",
    "label not 0/1",
    "csv that is binary",
    "parquet that is csv",
    "jsonl that is not json",
    "unknown extension",
    "missing excluded column",
]


def _bad_cases(df: pd.DataFrame) -> dict[str, tuple[str, object, list[str]]]:
    bad_label = df.assign(label=np.arange(len(df)) % 3)
    cases: dict[str, tuple[str, object, list[str]]] = {
        "empty file": (".csv", b"", []),
        "header only": (".csv", b"amount,hour\n", []),
        "one row": (".csv", df.iloc[:1], []),
        "label not 0/1": (".csv", bad_label, ["--label-column", "label"]),
        "csv that is binary": (".csv", b"PAR1\x00\x01\x02garbage" * 10, []),
        "parquet that is csv": (".parquet", df, []),
        "jsonl that is not json": (".jsonl", b"amount,hour\n1,2\n", []),
        "unknown extension": (".xlsx", df, []),
        "missing excluded column": (".csv", df, ["--exclude", "nope"]),
    }
    assert list(cases) == BAD_CASES
    return cases


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_training_data_fails_cleanly(
    case: str, small_df: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suffix, content, extra = _bad_cases(small_df)[case]
    data = tmp_path / f"data{suffix}"
    if isinstance(content, bytes):
        data.write_bytes(content)
    else:
        assert isinstance(content, pd.DataFrame)
        content.to_csv(data, index=False)  # for "parquet that is csv": a CSV named .parquet
    out = tmp_path / "bundle"
    code, _, err = run_main(capsys, "train", str(data), "--out", str(out), *FAST, *extra)
    assert code != 0
    assert err.startswith("error: ") and len(err.strip()) > 10
    assert "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.name], "something was written"


@pytest.mark.slow  # trains models
def test_constant_column_is_dropped_with_a_warning(
    small_df: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d.csv"
    small_df.assign(currency="USD", fee=0.0, note=np.nan).to_csv(data, index=False)
    code, _, err = run_main(capsys, "train", str(data), "--out", str(tmp_path / "b"), *FAST)
    assert code == 0
    assert "'currency' is constant" in err and "'fee' is constant" in err
    assert "'note' is missing in every record; dropped" in err  # nothing to learn: as constant
    names = {f.name for f in read_bundle(tmp_path / "b").manifest.features}
    assert not names & {"currency", "fee", "note"}


@pytest.mark.slow  # trains models
def test_existing_output_is_not_overwritten_without_asking(
    small_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = small_csv
    out = tmp_path / "b"
    assert run_main(capsys, "train", str(data), "--out", str(out), *FAST)[0] == 0
    first = read_bundle(out).manifest.version
    code, _, err = run_main(capsys, "train", str(data), "--out", str(out), *FAST)
    assert code != 0 and "exists" in err
    assert read_bundle(out).manifest.version == first
    assert run_main(capsys, "train", str(data), "--out", str(out), *FAST, "--overwrite")[0] == 0
    assert read_bundle(out).manifest.version != first


@pytest.mark.slow  # trains models
def test_training_threads_are_chosen_unless_given(
    small_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --threads: the count the rule gives for this model (torch's own default would be one
    per core); --threads N: N. The count used is recorded in the manifest and printed."""
    import torch

    data = small_csv
    code, out, err = run_main(capsys, "train", str(data), "--out", str(tmp_path / "a"), *FAST)
    assert code == 0, err
    m = read_bundle(tmp_path / "a").manifest
    assert m.config["threads"] is None
    assert m.metrics["threads"] == torch.get_num_threads() == 1
    assert "1 torch thread(s)" in out
    code, out, err = run_main(
        capsys, "train", str(data), "--out", str(tmp_path / "b"), *FAST, "--threads", "3"
    )
    assert code == 0, err
    m = read_bundle(tmp_path / "b").manifest
    assert m.config["threads"] == m.metrics["threads"] == torch.get_num_threads() == 3
    assert "3 torch thread(s)" in out
    code, _, err = run_main(
        capsys, "train", str(data), "--out", str(tmp_path / "c"), *FAST, "--threads", "0"
    )
    assert code == 2 and "threads must be in [1, 256]" in err
