"""Model lifecycle with real processes: concurrent and killed writers of a registry, hot reload
and rollback under load, the admin endpoints, broken versions refused while serving, several
workers converging, and the record sink feeding a retrain."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.bundle import MANIFEST_FILE, MODEL_FILE, read_bundle
from service.registry import STALE_SECONDS, Registry, new_version
from tests.conftest import (
    ROOT,
    Load,
    Server,
    add_version,
    cli_executable,
    fresh_registry,
    metric_samples,
    records,
    run_main,
    run_server,
    value,
)
from training.demo_data import generate_payments


def train_command(data: Path, registry: Path, epochs: int) -> list[str]:
    """`vae-anomaly train` of ``data`` into ``registry``, quiet, ids left out."""
    args = ["train", data, "--registry", registry, "--epochs", epochs, "--quiet"]
    return [cli_executable(), *map(str, args), "--exclude", "transaction_id"]


# ---------------------------------------------------------------- registry


def test_two_trainings_finishing_together_get_distinct_versions(tmp_path: Path) -> None:
    data = tmp_path / "pay.csv"
    generate_payments(300, seed=63).to_csv(data, index=False)
    cmd = train_command(data, tmp_path / "reg", epochs=2)
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    reg = Registry(tmp_path / "reg")
    versions = reg.versions()
    assert len(versions) == 2
    created = [reg.read(v).manifest.created_at for v in versions]
    assert created == sorted(created)
    assert reg.serving() in versions


KILLER = """
import sys
from service.registry import Registry
reg = Registry(sys.argv[1])
a, b = sys.argv[2], sys.argv[3]
print("go", flush=True)
while True:
    reg.promote(b, verify=False)
    reg.promote(a, verify=False)
    reg.rollback()
"""


def test_killing_a_pointer_writer_leaves_the_registry_valid(
    two_versions: tuple[Path, str, str], tmp_path: Path
) -> None:
    reg = fresh_registry(two_versions, tmp_path)
    _, v1, v2 = two_versions
    rng = random.Random(0)
    for _ in range(15):
        p = subprocess.Popen(
            [sys.executable, "-c", KILLER, str(reg.root), v1, v2], cwd=ROOT, stdout=subprocess.PIPE
        )
        assert p.stdout is not None and p.stdout.readline().strip() == b"go"
        time.sleep(rng.uniform(0.01, 0.3))
        p.send_signal(signal.SIGKILL)
        p.wait()
        pointer = reg.pointer()  # parses
        assert pointer.serving in (v1, v2)
        assert set(pointer.history) <= {v1, v2}
        assert reg.read_serving().manifest.version == pointer.serving  # verifies
    assert reg.versions() == [v1, v2]


def test_killing_a_training_mid_write_leaves_the_registry_valid(
    two_versions: tuple[Path, str, str], tmp_path: Path
) -> None:
    reg = fresh_registry(two_versions, tmp_path)
    _, v1, v2 = two_versions
    data = tmp_path / "pay.csv"
    generate_payments(3000, seed=64).to_csv(data, index=False)
    cmd = train_command(data, reg.root, epochs=30)
    leftovers_seen = False
    for delay in (3.0, 5.0, 7.0, 9.0):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        complete = reg.versions()
        assert complete[:2] == [v1, v2]
        for v in complete:
            read_bundle(reg.version_path(v))  # every listed version is whole and verifies
        assert reg.serving() == v1
        leftovers_seen |= any((reg.root / "versions").glob(".*"))
    # leftovers of killed writers are cleaned by prune once they are stale
    for d in (reg.root / "versions").glob(".*"):
        old = time.time() - STALE_SECONDS - 10
        os.utime(d, (old, old))
    reg.prune(keep=10)
    assert not list((reg.root / "versions").glob(".*"))
    assert reg.serving() == v1
    del leftovers_seen  # whether a kill landed mid-write depends on timing; validity does not


# ---------------------------------------------------------------- retraining


# ---------------------------------------------------------------- hot reload in the service


@pytest.fixture
def reg_server(
    two_versions: tuple[Path, str, str], tmp_path: Path
) -> Iterator[tuple[Server, Registry]]:
    reg = fresh_registry(two_versions, tmp_path)
    env = {"VAE_ANOMALY_POLL_INTERVAL": "0.3", "VAE_ANOMALY_ADMIN_TOKEN": "s3cret"}
    with run_server(["serve", "--registry", str(reg.root)], tmp_path, env=env) as s:
        yield s, reg


def test_promote_and_rollback_under_load_fail_no_request(
    reg_server: tuple[Server, Registry], two_versions: tuple[Path, str, str]
) -> None:
    server, reg = reg_server
    _, v1, v2 = two_versions
    recs = records(generate_payments(5, seed=68))
    with Load(server.url, recs) as load:
        time.sleep(1.0)
        reg.promote(v2)
        load.wait_for(v2)
        time.sleep(0.5)
        reg.rollback()
        load.wait_for(v1)
        time.sleep(0.5)
    statuses = [s for s, _ in load.results]
    assert len(statuses) > 50
    assert set(statuses) == {200}, f"failed requests: {[s for s in statuses if s != 200]}"
    seen = [v for _, v in load.results]
    switches = [seen[0]] + [b for a, b in itertools.pairwise(seen) if a != b]
    assert switches[0] == v1 and v2 in switches and switches[-1] == v1
    with httpx.Client(base_url=server.url) as c:
        samples = metric_samples(c)
        assert value(samples, "vae_anomaly_model_reloads_total", result="success") == 3
        assert value(
            samples, "vae_anomaly_model_info", name="payments", version=v1, score_type="elbo"
        ) in (0, 1)
        info = {
            dict(k[1])["version"]: v for k, v in samples.items() if k[0] == "vae_anomaly_model_info"
        }
        assert info[v1] == 1 and info[v2] == 0
        assert c.get("/readyz").json()["version"] == v1


def test_admin_reload_needs_the_token(
    reg_server: tuple[Server, Registry], two_versions: tuple[Path, str, str]
) -> None:
    server, reg = reg_server
    _, v1, v2 = two_versions
    with httpx.Client(base_url=server.url) as c:
        assert c.post("/v1/admin/reload").status_code == 401
        assert (
            c.post("/v1/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 403
        )
        ok = c.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json() == {
            "changed": False,
            "version": v1,
            "previous": None,
        }
        reg.promote(v2)
        r = c.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        # the poller may have been quicker; either way v2 serves now
        assert r.json()["version"] == v2
        assert c.get("/readyz").json()["version"] == v2
    assert "s3cret" not in server.logs()


def test_admin_endpoints_are_off_without_a_token(bundle_dir: Path, tmp_path: Path) -> None:
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp_path) as s:
        r = httpx.post(f"{s.url}/v1/admin/reload", headers={"Authorization": "Bearer x"})
        assert r.status_code == 404 and "off" in r.json()["error"]


def _broken_copy(reg: Registry, good: str, how: str, tmp: Path) -> str:
    v = new_version()
    dst = reg.version_path(v)
    stage = tmp / f"stage-{how}"
    shutil.copytree(reg.version_path(good), stage)
    manifest = json.loads((stage / MANIFEST_FILE).read_text())
    manifest["version"] = v
    if how == "checksum":
        with (stage / MODEL_FILE).open("r+b") as f:
            f.seek(200)
            f.write(b"\x00\x01\x02")
    elif how == "format":
        manifest["format_version"] = 99
    elif how == "onnx":
        import hashlib

        garbage = b"not an onnx model at all"
        (stage / MODEL_FILE).write_bytes(garbage)
        manifest["model"]["sha256"] = hashlib.sha256(garbage).hexdigest()
    (stage / MANIFEST_FILE).write_text(json.dumps(manifest))
    os.rename(stage, dst)
    return v


def test_broken_versions_are_refused_and_the_old_model_keeps_serving(
    reg_server: tuple[Server, Registry], two_versions: tuple[Path, str, str], tmp_path: Path
) -> None:
    server, reg = reg_server
    _, v1, v2 = two_versions
    # a good model whose features differ (no `device` column): refused unless allowed
    other = add_version(reg, generate_payments(800, seed=69).drop(columns=["device"]), epochs=3)
    cases = {how: _broken_copy(reg, v2, how, tmp_path) for how in ("checksum", "format", "onnx")}
    cases["schema"] = other
    reasons = {
        "checksum": "sha256",
        "format": "format version",
        "onnx": "onnxruntime",
        "schema": "changes the features",
    }
    recs = records(generate_payments(3, seed=70))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for how, v in cases.items():
            before = value(metric_samples(c), "vae_anomaly_model_reloads_total", result="failure")
            reg.promote(v, verify=False)  # as if it broke after promotion
            deadline = time.monotonic() + 10
            while (
                value(metric_samples(c), "vae_anomaly_model_reloads_total", result="failure")
                == before
            ):
                assert time.monotonic() < deadline, f"{how}: no refusal counted"
                time.sleep(0.1)
            r = c.post("/v1/score", json={"records": recs})
            assert r.status_code == 200 and r.json()["model"]["version"] == v1, how
            assert c.get("/readyz").status_code == 200
            assert reasons[how] in server.logs(), f"{how}: the log does not say why"
            # an admin reload is refused too, with the reason
            r = c.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 409 and reasons[how] in r.json()["error"]
        # a good version still goes through after all that (the pointer is at the version
        # without `device`: to the registry, going back to v2 adds it, a schema change)
        reg.promote(v2, allow_schema_change=True)
        deadline = time.monotonic() + 10
        while c.get("/readyz").json()["version"] != v2:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_every_worker_converges_to_the_new_version(
    two_versions: tuple[Path, str, str], tmp_path: Path
) -> None:
    reg = fresh_registry(two_versions, tmp_path)
    _, v1, v2 = two_versions
    assert reg.serving() == v1
    interval = 0.5
    env = {
        "VAE_ANOMALY_POLL_INTERVAL": str(interval),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    with run_server(
        ["serve", "--registry", str(reg.root), "--workers", "2"], tmp_path, env=env
    ) as s:
        recs = records(generate_payments(2, seed=71))
        reg.promote(v2)
        time.sleep(interval + 2.0)  # a poll, plus loading and warming up the new model
        versions = set()
        for _ in range(30):
            with httpx.Client(base_url=s.url, timeout=30) as c:  # new connections
                versions.add(c.post("/v1/score", json={"records": recs}).json()["model"]["version"])
        assert versions == {v2}
        pids = {p.stem.rsplit("_", 1)[-1] for p in (tmp_path / "prom").glob("counter_*.db")}
        assert len(pids) >= 2


# ---------------------------------------------------------------- the normal-record sink


def test_sink_collects_scored_records_for_retraining(
    serving_registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg_dir = tmp_path / "reg"
    shutil.copytree(serving_registry, reg_dir)
    sink = tmp_path / "sink"
    env = {"VAE_ANOMALY_SINK_DIR": str(sink), "VAE_ANOMALY_SINK_MAX_BYTES": "20000"}
    sent = flagged = 0
    with (
        run_server(["serve", "--registry", str(reg_dir)], tmp_path, env=env) as s,
        httpx.Client(base_url=s.url, timeout=30) as c,
    ):
        for seed in range(3):
            recs = records(generate_payments(100, seed=80 + seed))
            res = c.post("/v1/score", json={"records": recs}).json()["results"]
            sent += len(res)
            flagged += sum(1 for x in res if x["is_anomaly"])
        time.sleep(1.0)
        written = value(metric_samples(c), "vae_anomaly_sink_records_total")
    files = sorted(sink.glob("scored-*.jsonl"))
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    # every scored record, flagged or not, with its verdict and its id
    assert written == sent == len(lines) == 300
    assert sum(x["_is_anomaly"] for x in lines) == flagged
    assert len(files) > 1  # rotated at 20 kB
    assert isinstance(lines[0]["card_present"], bool) and "amount" in lines[0]
    assert lines[0]["transaction_id"].startswith("tx-080-")
    code, out, err = run_main(
        capsys, "retrain", str(sink), "--registry", str(reg_dir), "--epochs", "5", "--quiet"
    )
    assert code in (0, 3), err
    assert "gate:" in out
