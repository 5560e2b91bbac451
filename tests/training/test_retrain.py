"""Retraining through the promotion gate (training/retrain.py): a drifted but clean feed is
promoted, a model that fails the gate is not unless forced."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.registry import Registry
from tests.conftest import run_main
from training.demo_data import labelled


@pytest.fixture
def reg_dir(serving_registry: Path, tmp_path: Path) -> Path:
    """A copy of a registry whose one version serves, to retrain into."""
    shutil.copytree(serving_registry, tmp_path / "reg")
    return tmp_path / "reg"


@pytest.mark.slow  # trains models
def test_retrain_on_drifted_data_passes_the_gate_and_promotes(
    reg_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = Registry(reg_dir).serving()
    df = labelled(3000, 100, seed=66)
    df["amount"] = (df["amount"] * 3).round(2)  # prices went up: yesterday's normal drifted
    data = tmp_path / "new.csv"
    df.to_csv(data, index=False)
    code, out, err = run_main(
        capsys,
        "retrain",
        str(data),
        "--registry",
        str(reg_dir),
        "--epochs",
        "25",
        "--quiet",
        "--exclude",
        "transaction_id",
        "--label-column",
        "is_anomaly",
        "--warm-start",
    )
    assert code == 0, err
    reg = Registry(reg_dir)
    new = reg.serving()
    assert new != old and "[pass]" in out and "promoted" in out
    m = reg.read(new).manifest
    assert m.parent_version == old
    assert m.metrics["warm_started_tensors"] > 0
    assert "is_anomaly" in m.ignored_columns
    assert "ROC-AUC" in out
    # the serving model alarms far too often on the drifted data; the new one does not
    row = next(
        line for line in out.splitlines() if line.startswith("false-positive rate (held-out")
    )
    old_fpr, new_fpr = (float(x) for x in row.split()[-2:])
    assert old_fpr > 0.05 and new_fpr < 0.03


@pytest.mark.slow  # trains models
def test_retrain_gate_failure_does_not_promote_unless_forced(
    reg_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = Registry(reg_dir)
    old = reg.serving()
    data = tmp_path / "new.csv"
    labelled(1500, 60, seed=67).to_csv(data, index=False)
    common = [
        "--registry",
        str(reg_dir),
        "--epochs",
        "5",
        "--quiet",
        "--exclude",
        "transaction_id",
        "--label-column",
        "is_anomaly",
    ]
    # the ROC-AUC check demands a new AUC above the serving one + 0.5: it cannot pass
    code, out, _ = run_main(capsys, "retrain", str(data), *common, "--auc-margin", "-0.5")
    assert code == 3 and "[FAIL]" in out and "not promoted" in out
    assert reg.serving() == old and len(reg.versions()) == 2
    code, out, _ = run_main(
        capsys, "retrain", str(data), *common, "--max-fpr", "0", "--auc-margin", "-0.5", "--force"
    )
    assert code == 0 and "forced" in out
    assert reg.serving() != old and len(reg.versions()) == 3
