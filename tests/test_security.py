"""API keys, request timeouts and hostile bodies, against the real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.bundle import read_bundle
from tests.conftest import Server, cli_executable, records, run_server
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


def _v2_body(bundle_dir: Path, rec: dict[str, Any]) -> dict[str, Any]:
    m = read_bundle(bundle_dir).manifest
    types = {"numeric": "FP64", "boolean": "BOOL", "categorical": "BYTES"}
    return {
        "inputs": [
            {"name": f.name, "datatype": types[f.kind], "shape": [1], "data": [rec[f.name]]}
            for f in m.features
        ]
    }


def test_scoring_needs_a_configured_api_key(keyed: Server, bundle_dir: Path) -> None:
    rec = records(generate_payments(1, seed=70))[0]
    body = {"records": [rec]}
    name = read_bundle(bundle_dir).manifest.name
    infer = f"/v2/models/{name}/infer"
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        for method, path, payload in (
            ("POST", "/v1/score", body),
            ("GET", "/v1/model", None),
            ("POST", infer, _v2_body(bundle_dir, rec)),
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


@pytest.fixture(scope="module")
def open_server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp_path_factory.mktemp("o")) as s:
        yield s


def test_deep_nesting_is_refused_cleanly(open_server: Server, bundle_dir: Path) -> None:
    name = read_bundle(bundle_dir).manifest.name
    rec = records(generate_payments(1, seed=72))[0]
    with httpx.Client(base_url=open_server.url, timeout=30) as c:
        for depth in (2_000, 200_000):
            deep = b"[" * depth + b"]" * depth
            for path in ("/v1/score", f"/v2/models/{name}/infer"):
                r = c.post(path, content=deep, headers={"Content-Type": "application/json"})
                assert r.status_code == 400, (path, depth, r.text)
                assert "not valid JSON" in r.json()["error"]
        # nesting inside a record's field: the field is named, the request refused
        nested: Any = 1.0
        for _ in range(500):
            nested = [nested]
        bad = dict(rec, amount=nested)
        r = c.post("/v1/score", json={"records": [bad]})
        assert r.status_code == 422
        assert r.json()["errors"][0]["field"] == "amount"
        assert r.json()["errors"][0]["reason"] == "wrong_type"
        # a tensor whose data nests deeper than its shape allows
        body = _v2_body(bundle_dir, rec)
        body["inputs"][0]["data"] = nested
        r = c.post(f"/v2/models/{name}/infer", json=body)
        assert 400 <= r.status_code < 500, r.text
        assert c.get("/readyz").status_code == 200


def test_numbers_beyond_float_and_odd_tensor_data_are_4xx(
    open_server: Server, bundle_dir: Path
) -> None:
    name = read_bundle(bundle_dir).manifest.name
    rec = records(generate_payments(1, seed=73))[0]
    with httpx.Client(base_url=open_server.url, timeout=30) as c:
        # an integer of 401 digits: valid JSON, beyond any float
        text = json.dumps({"records": [dict(rec, amount="BIG")]}).replace('"BIG"', "1" + "0" * 400)
        r = c.post("/v1/score", content=text, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == "amount"
        body = _v2_body(bundle_dir, rec)
        for data in (5, "abc", {"a": 1}, None, ["BIG"]):
            body["inputs"][0]["data"] = data
            text = json.dumps(body).replace('"BIG"', "1" + "0" * 400)
            r = c.post(
                f"/v2/models/{name}/infer",
                content=text,
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code == 400, (data, r.text)


def test_query_parameters_are_checked(open_server: Server) -> None:
    recs = records(generate_payments(2, seed=74))
    with httpx.Client(base_url=open_server.url, timeout=30) as c:
        for params, field in (
            ({"explain": "abc"}, "explain"),
            ({"explain": "1001"}, "explain"),
            ({"explain": "-1"}, "explain"),
            ({"score": "mahalanobis"}, "score"),
        ):
            r = c.post("/v1/score", params=params, json={"records": recs})
            assert r.status_code == 422, (params, r.text)
            assert [e["field"] for e in r.json()["errors"]] == [field]
        r = c.post("/v1/score", params={"explain": "2", "score": "iwae"}, json={"records": recs})
        assert r.status_code == 200
        assert r.json()["model"]["score_type"] == "iwae"
        assert all(len(x["top_features"]) <= 2 for x in r.json()["results"])


def test_fast_and_careful_validation_agree(open_server: Server, bundle_dir: Path) -> None:
    """Records that take the fast path (plain values) and the same records written so that
    take the careful path (booleans as 0/1, a missing value left out instead of null) get the
    same scores, one by one and in a batch."""
    m = read_bundle(bundle_dir).manifest
    plain = records(generate_payments(20, seed=75))
    bools = [f.name for f in m.features if f.kind == "boolean"]
    nullable = [f.name for f in m.features if f.nullable]
    assert bools, "the test bundle has boolean features"
    careful = []
    for rec in plain:
        rec2 = dict(rec)
        for b in bools:
            rec2[b] = int(rec[b])
        for k in nullable:
            if rec2.get(k) is None:
                rec2.pop(k, None)
        careful.append(rec2)
    with httpx.Client(base_url=open_server.url, timeout=30) as c:
        a = c.post("/v1/score", json={"records": plain}).json()["results"]
        b = c.post("/v1/score", json={"records": careful}).json()["results"]
        one = [c.post("/v1/score", json={"records": [r]}).json()["results"][0] for r in careful]
    assert [x["score"] for x in a] == [x["score"] for x in b]
    assert [x["score"] for x in one] == pytest.approx([x["score"] for x in a], rel=1e-5)
    assert [x["top_features"] for x in a] == [x["top_features"] for x in b]
