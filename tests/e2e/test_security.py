"""API keys, request timeouts and hostile bodies, against the real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.bundle import read_bundle
from tests.conftest import Server, cli_executable, records, run_server, v2_body
from training.demo_data import generate_payments

KEYS = ("k-alpha-0123456789", "k-beta-9876543210")


@pytest.fixture(scope="module")
def keyed(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("keyed")
    keyfile = tmp / "keys"
    keyfile.write_text(f"# scoring clients\n{KEYS[0]}\n\n  {KEYS[1]}  \n")
    env = {"VAE_ANOMALY_API_KEYS_FILE": str(keyfile), "VAE_ANOMALY_REQUEST_TIMEOUT": "1"}
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp, env=env) as s:
        yield s


def test_scoring_needs_a_configured_api_key(keyed: Server, bundle_dir: Path) -> None:
    rec = records(generate_payments(1, seed=70))[0]
    body = {"records": [rec]}
    name = read_bundle(bundle_dir).manifest.name
    infer = f"/v2/models/{name}/infer"
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        for method, path, payload in (
            ("POST", "/v1/score", body),
            ("GET", "/v1/model", None),
            ("POST", infer, v2_body(bundle_dir, rec)),
            ("GET", f"/v2/models/{name}", None),
        ):
            r = c.request(method, path, json=payload)
            assert r.status_code == 401, (path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "API key" in r.json()["error"]
            wrong = c.request(method, path, json=payload, headers={"X-API-Key": "k-alpha"})
            assert wrong.status_code == 403, path
            basic = c.request(
                method, path, json=payload, headers={"Authorization": f"Basic {KEYS[0]}"}
            )
            assert basic.status_code == 401, path
            for headers in ({"Authorization": f"Bearer {KEYS[1]}"}, {"X-API-Key": KEYS[0]}):
                ok = c.request(method, path, json=payload, headers=headers)
                assert ok.status_code == 200, (path, headers, ok.text)
        # health, readiness and metrics stay open (probes and Prometheus carry no key)
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready"):
            assert c.get(path).status_code == 200, path
    logs = keyed.logs()
    assert all(k not in logs for k in KEYS)
    assert "k-alpha" not in logs


def test_an_empty_api_key_setting_refuses_to_start(bundle_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# nobody yet\n\n")
    for env in ({"VAE_ANOMALY_API_KEYS": " , "}, {"VAE_ANOMALY_API_KEYS_FILE": str(empty)}):
        r = subprocess.run(
            [cli_executable(), "serve", "--bundle", str(bundle_dir), "--port", "0"],
            env={**_clean_env(), **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2, r.stderr
        assert "API key" in r.stderr


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VAE_ANOMALY_")}


def test_a_request_that_stalls_is_answered_503_and_the_server_goes_on(keyed: Server) -> None:
    host, port = keyed.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # headers promise 1,000 bytes; send 10 and stall (a slow or stuck client)
        sock.sendall(
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"X-API-Key: {KEYS[0]}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"records"'
        )
        start = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        waited = time.monotonic() - start
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert b"took over 1 s" in body
    assert 0.9 < waited < 10
    r = httpx.post(
        f"{keyed.url}/v1/score",
        json={"records": records(generate_payments(2, seed=71))},
        headers={"X-API-Key": KEYS[0]},
        timeout=30,
    )
    assert r.status_code == 200
    lines = [json.loads(x) for x in keyed.logs().splitlines() if x.startswith("{")]
    assert any(x.get("route") == "/v1/score" and x.get("status") == 503 for x in lines)


def test_a_client_that_hangs_up_mid_body_is_no_server_error(keyed: Server) -> None:
    host, port = keyed.url.removeprefix("http://").split(":")
    for path in ("/v1/score", "/v2/models/payments/infer"):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
                + f"X-API-Key: {KEYS[0]}\r\nContent-Length: 1000\r\n\r\n".encode()
                + b'{"records": ['
            )
            time.sleep(0.3)
    time.sleep(0.5)
    text = httpx.get(f"{keyed.url}/metrics", timeout=10).text
    samples = {
        (s.labels.get("route"), s.labels.get("status")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "vae_anomaly_http_requests_total"
    }
    for route in ("/v1/score", "/v2/models/{name}/infer"):
        assert samples.get((route, "499")) == 1, samples
        assert (route, "500") not in samples
    assert "unexpected error" not in keyed.logs()


# ---------------------------------------------------------------- hostile bodies, open server
