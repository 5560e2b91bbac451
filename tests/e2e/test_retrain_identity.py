"""Retraining keeps the model's identity, the gate refuses what it must, the registry tells the
truth about what a service runs, and the sink lets the next model keep its false-positive rate.

Real CLI subprocesses, a real server (conftest ``run_server``) and real ONNX bundles throughout.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from service.bundle import read_bundle
from service.registry import GATE_FILE, Registry
from service.sink import SCORED_BY, VERDICT
from tests.conftest import records, run_cli, run_server, wait_until
from training.demo_data import generate_payments, labelled, make_anomalies
from training.retrain import _flags, binomial_tail_bound, flagged_check

CONFIG = """
name = "payments"
exclude = ["transaction_id", "session_id"]
label_column = "is_fraud"
hidden = [32, 16]
latent = 4
epochs = 6
threads = 2
calibration_fraction = 0.4

[columns.amount]
transform = "none"
"""


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = run_cli(*args, timeout=1800)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def payments(n: int, seed: int, anomalies: int = 0) -> pd.DataFrame:
    """Payments with an id, a session number (an id too: unique numbers) and a fraud label."""
    df = labelled(n, anomalies, seed).rename(columns={"is_anomaly": "is_fraud"})
    df["session_id"] = np.random.default_rng(seed).permutation(len(df)) + 10_000_000
    return df


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry serving v1, trained with exclusions, a label column and a config file."""
    tmp = tmp_path_factory.mktemp("identity")
    (tmp / "model.toml").write_text(CONFIG)
    payments(4000, seed=300, anomalies=80).to_csv(tmp / "old.csv", index=False)
    reg = tmp / "registry"
    cli("train", str(tmp / "old.csv"), "--registry", str(reg), "--config", str(tmp / "model.toml"))
    return reg


def copy_registry(src: Path, tmp: Path) -> Registry:
    import shutil

    shutil.copytree(src, tmp / "registry")
    return Registry(tmp / "registry")


def served(url: str) -> str:
    return str(httpx.get(f"{url}/v1/model", timeout=10).json()["version"])


# ---------------------------------------------------------------- identity and schema


def test_retrain_without_flags_keeps_name_config_and_features(v1: Path, tmp_path: Path) -> None:
    reg = copy_registry(v1, tmp_path)
    old = reg.read_serving().manifest
    new_csv = tmp_path / "new.csv"  # another name: the model is not named after the file
    payments(3000, seed=301, anomalies=60).to_csv(new_csv, index=False)
    r = cli("retrain", str(new_csv), "--registry", str(reg.root), "--quiet")
    assert "promoted" in r.stdout
    new = reg.read_serving().manifest
    assert new.version != old.version and new.parent_version == old.version
    assert new.name == old.name == "payments"
    assert [(f.name, f.kind) for f in new.features] == [(f.name, f.kind) for f in old.features]
    assert {"transaction_id", "session_id", "is_fraud"} <= set(new.ignored_columns)
    amount = next(f for f in new.features if f.name == "amount")
    assert amount.kind == "numeric" and amount.transform == "none"  # not re-inferred as log
    for key in ("exclude", "label_column", "hidden", "latent", "target_fpr", "epochs"):
        assert new.config[key] == old.config[key], key
    assert new.data.anomaly_rows == 0 and "ROC-AUC" in r.stdout  # labels used by the gate

    # a flag overrides one setting; the rest is still inherited
    r = cli("retrain", str(new_csv), "--registry", str(reg.root), "--quiet", "--target-fpr", "0.02")
    newer = reg.read_serving().manifest
    assert newer.target_fpr == 0.02 and newer.config["hidden"] == old.config["hidden"]
    # a different name is a different model
    r = cli("retrain", str(new_csv), "--registry", str(reg.root), "--name", "other", ok=False)
    assert r.returncode == 2 and "new model" in r.stderr and "vae-anomaly train" in r.stderr
    assert reg.serving() == newer.version


def test_schema_change_is_refused_by_the_gate_and_by_promote(v1: Path, tmp_path: Path) -> None:
    reg = copy_registry(v1, tmp_path)
    old = reg.serving()
    df = payments(2500, seed=302).drop(columns=["device"])
    df["terminal"] = np.random.default_rng(0).choice(["pos-a", "pos-b", "pos-c"], len(df))
    df.to_csv(tmp_path / "changed.csv", index=False)
    r = cli("retrain", str(tmp_path / "changed.csv"), "--registry", str(reg.root), ok=False)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "[FAIL] features clients send unchanged" in r.stdout
    assert "added 'terminal' (categorical)" in r.stdout
    assert "removed 'device' (categorical)" in r.stdout
    assert "not promoted" in r.stdout and "--allow-schema-change" in r.stdout
    assert reg.serving() == old
    changed = reg.versions()[-1]
    # --force does not override a schema change: that takes --allow-schema-change
    r = cli("models", "promote", changed, "--registry", str(reg.root), ok=False)
    assert r.returncode == 2 and "added 'terminal'" in r.stderr and reg.serving() == old
    gate = json.loads((reg.version_path(changed) / GATE_FILE).read_text())
    assert gate["passed"] is False and gate["promote"] is False
    cli("models", "promote", changed, "--registry", str(reg.root), "--allow-schema-change")
    assert reg.serving() == changed


def test_models_show_is_a_summary_with_the_gate(v1: Path, tmp_path: Path) -> None:
    reg = copy_registry(v1, tmp_path)
    payments(2500, seed=303, anomalies=50).to_csv(tmp_path / "new.csv", index=False)
    cli("retrain", str(tmp_path / "new.csv"), "--registry", str(reg.root), "--quiet")
    version = reg.serving()
    assert version is not None
    gate = reg.gate(version)
    assert gate is not None and gate["passed"] is True and gate["promote"] is True
    assert gate["data"]["records"] == 2550 and gate["data"]["labelled_anomalies"] == 50
    names = [c["name"] for c in gate["checks"]]
    assert "features clients send unchanged" in names and any("ROC-AUC" in n for n in names)
    fpr = next(c for c in gate["checks"] if c["name"].startswith("false-positive"))
    assert 0 <= fpr["figures"]["fpr"] <= fpr["figures"]["limit"]
    shown = cli("models", "show", version, "--registry", str(reg.root)).stdout
    assert len(shown.splitlines()) < 25, shown
    assert f"payments {version}" in shown and "gate: passed" in shown
    assert "[pass] false-positive rate on held-out new normal data" in shown
    raw = json.loads(cli("models", "show", version, "--registry", str(reg.root), "--json").stdout)
    assert raw["version"] == version and raw["gate"]["checks"] == gate["checks"]
    # the first version was trained, not retrained: no gate
    first = reg.versions()[0]
    assert "gate: none" in cli("models", "show", first, "--registry", str(reg.root)).stdout


# ---------------------------------------------------------------- poisoned data


def test_poisoned_unlabelled_data_is_refused_unless_forced(v1: Path, tmp_path: Path) -> None:
    reg = copy_registry(v1, tmp_path)
    old = reg.serving()
    normal = payments(3500, seed=304).drop(columns="is_fraud")
    bad = make_anomalies(1500, seed=305).drop(columns="anomaly_kind")
    bad["session_id"] = np.arange(len(bad))
    poisoned = pd.concat([normal, bad], ignore_index=True).sample(frac=1.0, random_state=0)
    poisoned.to_csv(tmp_path / "poisoned.csv", index=False)
    r = cli("retrain", str(tmp_path / "poisoned.csv"), "--registry", str(reg.root), ok=False)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "[FAIL] new data looks normal to the serving model" in r.stdout
    assert "not retrained" in r.stdout and "--force" in r.stdout
    row = next(x for x in r.stdout.splitlines() if x.startswith("flagged by the serving"))
    assert float(row.split()[-2]) > 0.1  # the share, reported: ten times the target
    assert reg.serving() == old and len(reg.versions()) == 1  # nothing trained
    r = cli("retrain", str(tmp_path / "poisoned.csv"), "--registry", str(reg.root), "--force")
    assert "forced" in r.stdout or "gate passed" in r.stdout
    gate = reg.gate(reg.versions()[-1])
    assert gate is not None and gate["forced"] is True
    flagged = next(c for c in gate["checks"] if c["name"].startswith("new data looks normal"))
    assert flagged["passed"] is False and flagged["figures"]["share"] > 0.1


def test_a_few_flags_in_a_small_sample_are_not_poison(v1: Path) -> None:
    bundle = Registry(v1).read_serving()
    target = bundle.manifest.target_fpr
    assert binomial_tail_bound(4, 50, target) > 1e-3  # 4 of 50 at 1%: chance can do that
    assert binomial_tail_bound(80, 1000, target) < 1e-20  # 8% of 1000 cannot
    normal = payments(600, seed=306).drop(columns="is_fraud")
    flags = _flags(bundle, normal)
    assert flags is not None
    quiet = normal[~flags].iloc[:46]
    loud = make_anomalies(200, seed=307).drop(columns="anomaly_kind")
    loud = loud[_flags(bundle, loud)]
    small = pd.concat([quiet, loud.iloc[:4]], ignore_index=True)  # 8% flagged, 50 records
    check = flagged_check(bundle, small, None)
    assert check is not None and check[0].figures["share"] == pytest.approx(0.08)
    assert check[0].figures["share"] > check[0].figures["limit"] and check[0].passed
    big = pd.concat([normal[~flags].iloc[:460], loud.iloc[:40]], ignore_index=True)
    check = flagged_check(bundle, big, None)
    assert check is not None and check[0].figures["share"] == pytest.approx(0.08)
    assert not check[0].passed


# ---------------------------------------------------------------- the whole story, served


def send(url: str, df: pd.DataFrame, batch: int = 1000) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(0, len(df), batch):
            r = c.post("/v1/score", json={"records": records(df.iloc[i : i + batch])})
            assert r.status_code == 200, r.text


def test_the_whole_story_served(v1: Path, tmp_path: Path) -> None:
    reg = copy_registry(v1, tmp_path)
    first = reg.serving()
    sink = tmp_path / "sink"
    env = {"VAE_ANOMALY_POLL_INTERVAL": "0.3", "VAE_ANOMALY_SINK_DIR": str(sink)}
    root = str(reg.root)
    with run_server(["serve", "--registry", root], tmp_path, env=env) as s:
        assert httpx.get(f"{s.url}/v2/models/payments").status_code == 200
        listed = cli("models", "list", "--registry", root, "--service", s.url).stdout
        assert f"* {first}" in listed and "[serving]  [loaded by the service]" in listed

        # 1. retrain on a new file, no flags: same name, the service moves, V2 URL unchanged
        payments(3000, seed=310).to_csv(tmp_path / "new.csv", index=False)
        cli("retrain", str(tmp_path / "new.csv"), "--registry", root, "--quiet")
        second = reg.serving()
        assert second != first
        wait_until(
            lambda: served(s.url) == second,
            "the service never moved to the retrain",
            timeout=30,
            every=0.2,
        )
        assert httpx.get(f"{s.url}/v2/models/payments").json()["versions"] == [second]

        # 2. traffic fills the sink (ids and verdicts kept); retrain on it, no flags
        send(s.url, generate_payments(3000, seed=311).assign(session_id=7))
        wait_until(
            lambda: len(sink_lines(sink)) == 3000,
            "the sink did not get every record",
            timeout=30,
            every=0.2,
        )
        line = sink_lines(sink)[0]
        assert line["transaction_id"].startswith("tx-311-") and line["session_id"] == 7
        assert isinstance(line[VERDICT], bool) and line[SCORED_BY] == second
        cli("retrain", str(sink), "--registry", root, "--quiet")
        third = reg.serving()
        assert third != second and reg.read(third).manifest.name == "payments"
        wait_until(
            lambda: served(s.url) == third,
            "the service never moved to the sink retrain",
            timeout=30,
            every=0.2,
        )
        assert httpx.get(f"{s.url}/v2/models/payments/ready").status_code == 200

        # 3. a retrain that changes the features is refused, with the reason
        changed = payments(2500, seed=312)
        changed["terminal"] = np.random.default_rng(1).choice(["a", "b", "c"], len(changed))
        changed.to_csv(tmp_path / "changed.csv", index=False)
        r = cli("retrain", str(tmp_path / "changed.csv"), "--registry", root, ok=False)
        assert r.returncode == 3 and "added 'terminal'" in r.stdout and reg.serving() == third

        # 4. forced past the registry, the service refuses it; `models list` says so
        fourth = reg.versions()[-1]
        cli("models", "promote", fourth, "--registry", root, "--allow-schema-change")
        wait_until(
            lambda: "changes the features" in s.logs(),
            "the service did not refuse it",
            timeout=30,
            every=0.2,
        )
        assert served(s.url) == third
        listed = cli("models", "list", "--registry", root, "--service", s.url).stdout
        line4 = next(x for x in listed.splitlines() if fourth in x)
        assert line4.startswith("*") and "NOT LOADED" in line4 and "added 'terminal'" in line4
        line3 = next(x for x in listed.splitlines() if x.startswith(f"  {third}"))
        assert "[loaded by the service]" in line3


def sink_lines(folder: Path) -> list[dict[str, object]]:
    return [
        json.loads(x) for f in sorted(folder.glob("*.jsonl")) for x in f.read_text().splitlines()
    ]


# ---------------------------------------------------------------- the sink keeps the FPR honest


def test_a_model_retrained_from_the_sink_keeps_its_false_positive_rate(
    v1: Path, tmp_path: Path
) -> None:
    """Stationary traffic through the real service into the sink; retrain on the sink; the new
    model's false-positive rate on 25,000 fresh records is near its 1% target."""
    reg = copy_registry(v1, tmp_path)
    sink = tmp_path / "sink"
    env = {"VAE_ANOMALY_SINK_DIR": str(sink)}
    with run_server(["serve", "--registry", str(reg.root)], tmp_path, env=env) as s:
        send(s.url, generate_payments(30_000, seed=320), batch=5000)
        wait_until(
            lambda: len(sink_lines(sink)) == 30_000,
            "the sink did not get every record",
            timeout=30,
            every=0.2,
        )
    lines = sink_lines(sink)
    flagged = sum(bool(x[VERDICT]) for x in lines) / len(lines)
    assert 0 < flagged < 0.05  # flagged records are kept: the sink is a sample of the traffic
    cli("retrain", str(sink), "--registry", str(reg.root), "--quiet")
    new = reg.read_serving()
    assert new.manifest.target_fpr == 0.01 and new.manifest.data.calibration_rows > 9000
    fresh = generate_payments(25_000, seed=321)
    flags = _flags(new, fresh)
    assert flags is not None
    fpr = float(flags.mean())
    assert 0.007 <= fpr <= 0.015, fpr
    assert read_bundle(reg.version_path(new.manifest.version)).manifest.name == "payments"


def test_the_sink_keeps_a_uniform_sample_of_all_verdicts(v1: Path, tmp_path: Path) -> None:
    from service.sink import RecordSink

    manifest = Registry(v1).read_serving().manifest
    sink = RecordSink(tmp_path / "sink", max_bytes=1 << 20, keep=5, sample=0.3)
    n = 20_000
    flagged = np.arange(n) % 10 == 0  # 10% flagged
    amount = list(range(n))
    sent = [{"transaction_id": f"t{i}", "session_id": i} for i in range(n)]
    sink.offer(manifest, {"amount": amount}, flagged, sent)
    sink.close()
    lines = sink_lines(tmp_path / "sink")
    assert abs(len(lines) - 0.3 * n) < 4 * (n * 0.3 * 0.7) ** 0.5  # a 30% sample
    # uniform: the flagged share and the values are those of the whole
    share = sum(bool(x[VERDICT]) for x in lines) / len(lines)
    assert abs(share - 0.1) < 4 * (0.09 / len(lines)) ** 0.5
    assert all(x["transaction_id"] == f"t{x['amount']}" for x in lines)
    assert abs(np.mean([x["amount"] for x in lines]) - n / 2) < 0.02 * n
