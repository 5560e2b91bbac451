"""Starting the service: settings, refusal of broken bundles, the demo, the torch-free install."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.bundle import MODEL_FILE
from tests.conftest import ROOT, cli_executable, run_server
from training.demo_data import generate_payments


def start_fails(args: list[str], env: dict[str, str] | None = None) -> str:
    r = subprocess.run(
        [cli_executable(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    return r.stderr


@pytest.mark.parametrize(
    "args,env,named",
    [
        (["--port", "99999"], {}, "VAE_ANOMALY_PORT"),
        (["--workers", "0"], {}, "VAE_ANOMALY_WORKERS"),
        ([], {"VAE_ANOMALY_MAX_RECORDS": "lots"}, "VAE_ANOMALY_MAX_RECORDS"),
        ([], {"VAE_ANOMALY_UNKNOWN_FIELDS": "maybe"}, "VAE_ANOMALY_UNKNOWN_FIELDS"),
        ([], {"VAE_ANOMALY_EXPLAIN": "-1"}, "VAE_ANOMALY_EXPLAIN"),
    ],
)
def test_a_bad_setting_stops_the_start_and_is_named(
    bundle_dir: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    err = start_fails(["serve", "--bundle", str(bundle_dir), *args], env)
    assert named in err


def test_no_bundle_or_a_broken_one_stops_the_start(bundle_dir: Path, tmp_path: Path) -> None:
    assert "--bundle" in start_fails(["serve"])
    assert "not a bundle directory" in start_fails(["serve", "--bundle", str(tmp_path / "x")])
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    with (broken / MODEL_FILE).open("r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff")
    assert "sha256" in start_fails(["serve", "--bundle", str(broken)])


def test_settings_come_from_the_environment(bundle_dir: Path, tmp_path: Path) -> None:
    env = {"VAE_ANOMALY_BUNDLE": str(bundle_dir), "VAE_ANOMALY_EXPLAIN": "1"}
    with run_server(["serve"], tmp_path, env=env) as s:
        rec = generate_payments(1, seed=50).drop(columns=["device", "distance_from_home_km"])
        body = {
            "records": [
                {
                    k: (None if isinstance(v, float) and v != v else v)
                    for k, v in rec.iloc[0].to_dict().items()
                }
            ]
        }
        r = httpx.post(f"{s.url}/v1/score", json=body, params={"score": "elbo"}, timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.json()["results"][0]["top_features"]) <= 1
        # logs are JSON lines carrying the request id
        rid = "trace-me-42"
        httpx.post(f"{s.url}/v1/score", json=body, headers={"X-Request-ID": rid}, timeout=30)
        time.sleep(0.3)
        lines = [json.loads(x) for x in s.logs().splitlines() if x.startswith("{")]
        assert any(
            x.get("request_id") == rid and x.get("route") == "/v1/score" and x["status"] == 200
            for x in lines
        )


def test_demo_trains_once_then_serves(tmp_path: Path) -> None:
    env = {"VAE_ANOMALY_HOME": str(tmp_path / "home")}
    with run_server(["demo", "--quiet"], tmp_path, env=env, timeout=420) as s:
        info = httpx.get(f"{s.url}/v1/model", timeout=30).json()
        assert info["name"] == "demo-payments"
        bundle = tmp_path / "home" / "demo" / "payments"
        assert (bundle / "manifest.json").exists()
        version = info["version"]
    # a second start reuses the bundle instead of training again
    with run_server(["demo", "--quiet"], tmp_path, env=env, timeout=60) as s:
        assert httpx.get(f"{s.url}/v1/model", timeout=30).json()["version"] == version
        assert "training the demo model" not in s.logs()


def test_serve_install_has_no_torch(bundle_dir: Path, tmp_path: Path) -> None:
    """A fresh venv with only the `serve` extra starts the service and scores."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    r = subprocess.run([*pip, f"{ROOT}[serve]"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    py = str(venv / "bin" / "python")
    probe = subprocess.run(
        [
            py,
            "-c",
            "import importlib.util as u; "
            "print([m for m in ('torch', 'pandas', 'onnx', 'matplotlib') "
            "if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    size_mb = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file()) / 1e6
    print(f"serve-only venv: {size_mb:.0f} MB")
    assert size_mb < 400
    exe = str(venv / "bin" / "vae-anomaly")
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp_path, exe=exe) as s:
        rec = generate_payments(1, seed=51).iloc[0].to_dict()
        rec = {k: (None if isinstance(v, float) and v != v else v) for k, v in rec.items()}
        r = httpx.post(f"{s.url}/v1/score", json={"records": [rec]}, timeout=30)
        assert r.status_code == 200, r.text
        assert math.isfinite(r.json()["results"][0]["score"])
    # training needs the train extra, and says so
    r = subprocess.run(
        [exe, "train", "x.csv", "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "vae-anomaly[train]" in r.stderr and "Traceback" not in r.stderr
