"""An attack pass against the real service (API keys, admin token and metadata protection on):
memory, the event loop, connections, inputs that must be 4xx, exposure."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.bundle import read_bundle
from tests.conftest import (
    Server,
    cli_executable,
    health_while,
    healthz_seconds,
    records,
    run_server,
    v2_body,
)
from training.demo_data import generate_payments

KEY = "k-adversarial-0123456789"
ADMIN = "admin-adversarial-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPEN_FILES = 256  # the server runs with this open-file limit
HEADER_TIMEOUT = 2.0
BODY_LIMIT = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("adversarial")
    wrapper = tmp / "serve-with-few-files"
    wrapper.write_text(f'#!/bin/sh\nulimit -n {OPEN_FILES}\nexec {cli_executable()} "$@"\n')
    wrapper.chmod(0o755)
    env = {
        "VAE_ANOMALY_API_KEYS": KEY,
        "VAE_ANOMALY_ADMIN_TOKEN": ADMIN,
        "VAE_ANOMALY_PROTECT_METADATA": "true",
        "VAE_ANOMALY_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "VAE_ANOMALY_REQUEST_TIMEOUT": "20",
    }
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp, env=env, exe=str(wrapper)) as s:
        yield s


def _addr(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _rec() -> dict[str, Any]:
    return records(generate_payments(1, seed=90))[0]


def _post(server: Server, path: str, body: bytes, **headers: str) -> httpx.Response:
    h = {**AUTH, "Content-Type": "application/json", **headers}
    return httpx.post(f"{server.url}{path}", content=body, headers=h, timeout=60)


# ---------------------------------------------------------------- hostile bodies


def _under(limit: int, make: Any, n: int) -> bytes:
    """The body ``make(k)`` for the largest k <= n (about) that fits ``limit``."""
    while True:
        body: bytes = make(n)
        if len(body) <= limit:
            return body
        n = n * limit // len(body) - 1


def hostile_bodies(limit: int = BODY_LIMIT) -> dict[str, bytes]:
    """Bodies up to ``limit`` that are costly to parse or to answer, each another shape."""
    rec = _rec()

    def _under_limit(make: Any, n: int) -> bytes:
        return _under(limit, make, n)

    return {
        # unknown fields spread over many records, some nested
        "unknown fields in records": _under_limit(
            lambda n: json.dumps(
                {
                    "records": [
                        dict(rec, **{f"u{i}_{j}": {"v": [j]} for j in range(55)}) for i in range(n)
                    ]
                }
            ).encode(),
            10_000,
        ),
        # one record of distinct unknown fields
        "one wide record": _under_limit(
            lambda n: json.dumps({"records": [{f"f{i}": i for i in range(n)}]}).encode(),
            2_000_000,
        ),
        # distinct top-level keys
        "top-level keys": _under_limit(
            lambda n: json.dumps({"records": [rec], **{f"t{i}": 0 for i in range(n)}}).encode(),
            2_000_000,
        ),
        # more records than allowed, each tiny
        "tiny records": _under_limit(
            lambda n: b'{"records":[' + b",".join([b"{}"] * n) + b"]}", 8_000_000
        ),
        # an ignored column holding millions of empty arrays
        "deep arrays": _under_limit(
            lambda n: json.dumps({"records": [dict(rec, transaction_id=[[[]]] * n)]}).encode(),
            3_000_000,
        ),
    }


@pytest.fixture(scope="module")
def hostile() -> dict[str, bytes]:
    return hostile_bodies()


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the parser process), in MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except FileNotFoundError:
            continue
        rss = [int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS")]
        total += sum(rss)  # none: a process that has just ended
    return total / 1024


def test_hostile_bodies_get_a_short_4xx_or_a_score(
    server: Server, hostile: dict[str, bytes]
) -> None:
    for name, body in hostile.items():
        assert len(body) > BODY_LIMIT * 0.8, name
        r = _post(server, "/v1/score", body)
        if name == "deep arrays":  # an ignored column may hold anything: scored
            assert r.status_code == 200, r.text[:300]
            continue
        assert r.status_code == 422, (name, r.text[:300])
        assert len(r.content) < 50_000, name  # the error list is capped
        assert len(r.json()["errors"]) <= 100, name
    wide = _post(server, "/v1/score", hostile["unknown fields in records"]).json()
    assert "errors listed" in wide["error"]  # the count of all errors is said


def test_memory_stays_flat_after_many_hostile_bodies(server: Server) -> None:
    # a quarter of the limit each (a 16 MB one takes seconds here); before the fix each such
    # body left ~75 MB behind until a full collection, so the peak is measured, not the end
    shapes = hostile_bodies(BODY_LIMIT // 4)
    bodies = [shapes["unknown fields in records"], shapes["one wide record"]]
    for body in bodies * 2:  # warm-up
        _post(server, "/v1/score", body)
    before = tree_rss_mb(server.proc.pid)
    seen = []
    for i in range(50):
        r = _post(server, "/v1/score", bodies[i % len(bodies)])
        assert r.status_code == 422
        seen.append(tree_rss_mb(server.proc.pid))
    assert max(seen) - before < 50, (before, seen)


def test_health_answers_within_50_ms_while_any_body_is_handled(
    server: Server, bundle_dir: Path, hostile: dict[str, bytes]
) -> None:
    name = read_bundle(bundle_dir).manifest.name
    v2_wide = _under(  # many inputs of distinct names
        BODY_LIMIT,
        lambda n: json.dumps(
            {
                "inputs": [
                    {"name": f"x{i}", "datatype": "FP64", "shape": [1], "data": [0]}
                    for i in range(n)
                ]
            }
        ).encode(),
        300_000,
    )
    jobs = [("/v1/score", b) for b in hostile.values()] + [(f"/v2/models/{name}/infer", v2_wide)]
    for path, body in jobs:
        # The machine is shared: a poll can wait for a CPU whatever the server does. A body
        # that stops the event loop delays the polls in every run (by seconds before the
        # helper process); so each body gets up to three runs, and one must be clean.
        runs = []
        for _ in range(3):
            status, polled = health_while(server, lambda: _post(server, path, body).status_code)  # noqa: B023  (joined before the loop goes on)
            assert status in (200, 400, 422), (path, status)
            runs.append(polled)
            if max(polled) < 0.050:
                break
        slowest = min(max(r) for r in runs)
        assert slowest < 0.050, (path, body[:60], [sorted(r)[-3:] for r in runs])


# ---------------------------------------------------------------- connections


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing ``sock`` within ``seconds``; None if still open."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return got


def test_silent_connections_are_closed_and_new_clients_answered(server: Server) -> None:
    silent = []
    try:
        for _ in range(OPEN_FILES + 44):  # more than the server's open-file limit
            silent.append(socket.create_connection(_addr(server), timeout=10))
        # the limit (192 here) closes the longest-waiting ones; new clients are answered
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for _ in range(20):
                r = c.get("/healthz", headers={"Connection": "close"})
                assert r.status_code in (200, 503)
        start = time.monotonic()
        for s in silent:
            left = HEADER_TIMEOUT + 5 - (time.monotonic() - start)
            assert _closed_within(s, max(left, 0.1)) is not None, "a silent socket stayed open"
        assert time.monotonic() - start < HEADER_TIMEOUT + 5
    finally:
        for s in silent:
            s.close()
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_a_slow_head_is_cut_off_with_408(server: Server) -> None:
    with socket.create_connection(_addr(server), timeout=10) as s:
        start = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        got = None
        for i in range(40):  # one header line every 0.25 s, never the end of the head
            try:
                s.sendall(f"X-Drip-{i}: y\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                break
            got = _closed_within(s, 0.25)
            if got is not None:
                break
        waited = time.monotonic() - start
    assert got is not None and got.startswith(b"HTTP/1.1 408"), got
    assert HEADER_TIMEOUT - 0.5 < waited < HEADER_TIMEOUT + 3


def test_a_kept_alive_connection_cannot_stall_its_next_head(server: Server) -> None:
    with socket.create_connection(_addr(server), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""  # the whole first response (head and body may come in separate segments)
        while not first.endswith(b'{"status":"ok"}'):
            chunk = s.recv(4096)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request's head, never finished
        got = _closed_within(s, HEADER_TIMEOUT + 5)
    assert got is not None and got.startswith(b"HTTP/1.1 408"), got


def test_busy_connections_make_new_requests_503_not_tcp_errors(
    bundle_dir: Path, tmp_path: Path
) -> None:
    env = {"VAE_ANOMALY_MAX_CONNECTIONS": "8", "VAE_ANOMALY_REQUEST_TIMEOUT": "30"}
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp_path, env=env) as srv:
        busy = []
        try:
            for _ in range(8):  # requests whose bodies never finish: busy, not idle
                s = socket.create_connection(_addr(srv), timeout=10)
                s.sendall(
                    b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{"
                )
                busy.append(s)
            time.sleep(0.5)
            r = httpx.get(f"{srv.url}/healthz", timeout=10)
            assert r.status_code == 503
            assert "too many connections" in r.json()["error"]
        finally:
            for s in busy:
                s.close()
        time.sleep(0.5)
        assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200


def test_request_heads_are_limited(server: Server) -> None:
    # many small headers
    many = {f"x-h{i}": "1" for i in range(150)}
    r = httpx.get(f"{server.url}/healthz", headers=many, timeout=10)
    assert r.status_code == 431
    assert (
        httpx.get(f"{server.url}/healthz", headers=dict(list(many.items())[:80])).status_code == 200
    )
    # one huge header, sent in pieces: refused after about the limit, not read to the end
    with socket.create_connection(_addr(server), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        start = time.monotonic()
        try:
            while sent < 100 * 1024 * 1024:
                s.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = _closed_within(s, 5)
    assert sent < 8 * 1024 * 1024, sent
    assert time.monotonic() - start < 5
    assert got is None or got == b"" or got.startswith(b"HTTP/1.1 431"), got
    assert healthz_seconds(server) < 1


def test_the_unread_rest_of_a_refused_body_is_no_request_head(server: Server) -> None:
    # 413 from the declared length, answered while the body still comes: that body must not
    # count as the next request's head (a 431 would cut the connection under the client)
    big = b'{"records": [' + b"0," * (BODY_LIMIT // 2 + 10) + b"0]}"
    with httpx.Client(base_url=server.url, timeout=30, headers=AUTH) as c:
        for _ in range(2):
            r = c.post("/v1/score", content=big, headers={"Content-Type": "application/json"})
            assert r.status_code == 413, r.text
        assert c.get("/healthz").status_code == 200


# ---------------------------------------------------------------- inputs that must be 4xx


def test_lone_surrogates_anywhere_are_400(server: Server, bundle_dir: Path) -> None:
    name = read_bundle(bundle_dir).manifest.name
    rec = json.dumps({"records": [_rec()]})
    infer = f"/v2/models/{name}/infer"
    v2 = json.dumps(v2_body(bundle_dir, _rec()))
    cases = [
        ("/v1/score", rec.replace('"amount"', '"\\ud800"')),  # a record key
        ("/v1/score", rec.replace('{"records"', '{"\\udfff": 1, "records"')),  # a top-level key
        ("/v1/score", rec.replace('"merchant_category": "', '"merchant_category": "\\udc00')),
        ("/v1/score", rec.replace('"transaction_id": "', '"transaction_id": "\\ud83d')),
        (infer, v2.replace('{"inputs"', '{"id": "\\ud800", "inputs"')),  # the V2 id
        (infer, v2.replace('"name": "amount"', '"name": "amount\\udead"')),
        (
            infer,
            v2.replace(
                '"datatype": "BYTES", "shape": [1], "data": ["',
                '"datatype": "BYTES", "shape": [1], "data": ["\\ud9ff',
            ),
        ),
        # a big body: parsed in the helper process
        (
            "/v1/score",
            rec.replace('"amount"', '"\\ud800"').replace(
                '"records"', f'"pad": "{"p" * 100_000}", "records"'
            ),
        ),
    ]
    for path, body in cases:
        assert "\\ud" in body.lower(), body[:200]
        r = _post(server, path, body.encode())
        assert r.status_code == 400, (path, body[:120], r.text[:200])
        assert "surrogate" in r.json()["error"]
    # a pair is one character, and fine
    ok = rec.replace('"merchant_category": "', '"merchant_category": "\\ud83d\\ude00')
    assert _post(server, "/v1/score", ok.encode()).status_code == 200


def test_a_v2_id_is_a_string(server: Server, bundle_dir: Path) -> None:
    name = read_bundle(bundle_dir).manifest.name
    body = v2_body(bundle_dir, _rec())
    deep: Any = "x"
    for _ in range(300):
        deep = [deep]
    for rid in (2**70, 1.5, True, {"a": 1}, deep, ["a"]):
        r = _post(server, f"/v2/models/{name}/infer", json.dumps(dict(body, id=rid)).encode())
        assert r.status_code == 400, (str(rid)[:40], r.text[:200])
        assert "'id' must be a string" in r.json()["error"]
    r = _post(server, f"/v2/models/{name}/infer", json.dumps(dict(body, id="req-1")).encode())
    assert r.status_code == 200 and r.json()["id"] == "req-1"


def test_v2_numbers_must_fit_their_datatype(server: Server, bundle_dir: Path) -> None:
    name = read_bundle(bundle_dir).manifest.name
    body = v2_body(bundle_dir, _rec())
    hour = next(i for i, t in enumerate(body["inputs"]) if t["name"] == "hour")

    def send(dt: str, v: Any) -> int:
        b = json.loads(json.dumps(body))
        b["inputs"][hour].update(datatype=dt, data=[v])
        return _post(server, f"/v2/models/{name}/infer", json.dumps(b).encode()).status_code

    for dt, v in [
        ("INT8", 42.5),
        ("INT8", 128),
        ("UINT8", -5),
        ("UINT8", 256),
        ("INT16", 1e6),
        ("UINT64", -1),
        ("INT32", 2**31),
        ("FP16", 70000.0),
        ("FP32", 1e39),
    ]:
        assert send(dt, v) == 400, (dt, v)
    for dt, v in [
        ("INT8", -128),
        ("INT8", 12.0),
        ("UINT8", 255),
        ("UINT64", 2**64 - 1),
        ("FP16", 12.5),
        ("FP32", -3.0e38),
        ("FP64", 1e300),
    ]:
        assert send(dt, v) == 200, (dt, v)


def test_explain_is_plain_decimal(server: Server) -> None:
    body = json.dumps({"records": [_rec()]}).encode()
    for bad in ("1_0", "\u0661", " 1", "+1", "0x1", "1e1", "10" * 20):
        r = httpx.post(
            f"{server.url}/v1/score",
            params={"explain": bad},
            content=body,
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=30,
        )
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["errors"][0]["field"] == "explain"
    r = httpx.post(
        f"{server.url}/v1/score",
        params={"explain": "2"},
        content=body,
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 200 and len(r.json()["results"][0]["top_features"]) == 2


def test_only_json_bodies_are_read(server: Server, bundle_dir: Path) -> None:
    name = read_bundle(bundle_dir).manifest.name
    native = json.dumps({"records": [_rec()]}).encode()
    v2 = json.dumps(v2_body(bundle_dir, _rec())).encode()
    for path, body in (("/v1/score", native), (f"/v2/models/{name}/infer", v2)):
        for ctype in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "json",
            None,
        ):
            h = {**AUTH} if ctype is None else {**AUTH, "Content-Type": ctype}
            r = httpx.post(f"{server.url}{path}", content=body, headers=h, timeout=30)
            assert r.status_code == 415, (path, ctype, r.text)
            assert "application/json" in r.json()["error"]
        for ctype in ("application/json; charset=utf-8", "Application/JSON"):
            r = _post(server, path, body, **{"Content-Type": ctype})
            assert r.status_code == 200, (path, ctype, r.text)
        # compressed: said so, whether declared or not
        r = _post(server, path, gzip.compress(body), **{"Content-Encoding": "gzip"})
        assert r.status_code == 415 and "Content-Encoding" in r.json()["error"]
        r = _post(server, path, gzip.compress(body))
        assert r.status_code == 415 and "gzip" in r.json()["error"]


# ---------------------------------------------------------------- exposure


# ---------------------------------------------------------------- the parser process, in-process


def test_the_parser_process_reports_errors_counts_and_survives_a_kill(bundle_dir: Path) -> None:
    from prometheus_client import REGISTRY

    from service.errors import InvalidRecords, Timeout
    from service.http import parsed_with
    from service.parser_process import ParserProcess
    from service.records import RecordPlan, records_to_columns
    from service.settings import Settings

    m = RecordPlan(read_bundle(bundle_dir).manifest)
    settings = Settings()
    bad = json.dumps({"records": [{"nope": 1}] * 3}).encode()
    good = json.dumps({"records": [_rec()] * 2}).encode()

    def missing() -> float:
        v = REGISTRY.get_sample_value(
            "vae_anomaly_invalid_records_total", {"reason": "unknown_field"}
        )
        return v or 0.0

    async def scenario() -> None:
        p = ParserProcess()
        try:
            before = missing()
            with pytest.raises(InvalidRecords) as e:
                await p.run(parsed_with, records_to_columns, bad, m, settings)
            assert e.value.errors[0]["field"] == "nope" and e.value.status_code == 422
            assert missing() == before + 3  # counted here, not lost in the helper
            parsed = await p.run(parsed_with, records_to_columns, good, m, settings)
            assert parsed.n == 2 and parsed.columns["amount"] == [_rec()["amount"]] * 2
            os.kill(await p.run(os.getpid), 9)
            with pytest.raises(Timeout):  # the helper died: a 503, and a new helper
                await p.run(os.getpid)
            assert (await p.run(parsed_with, records_to_columns, good, m, settings)).n == 2
        finally:
            p.close()

    asyncio.run(scenario())
