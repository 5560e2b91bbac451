"""The HTTP client (service/client.py) against the real service; retries against real sockets."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from service.client import AsyncClient, AuthError, Client, RequestError, Unavailable, to_json_value
from tests.conftest import Server, free_port, run_server
from training.demo_data import generate_payments, make_anomalies

KEY = "client-test-key-0123456789"


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("client")
    env = {"VAE_ANOMALY_API_KEYS": KEY, "VAE_ANOMALY_MAX_RECORDS": "50"}
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp, env=env) as s:
        yield s


def frame(n: int, seed: int) -> pd.DataFrame:
    return generate_payments(n, seed=seed).drop(columns=["transaction_id"], errors="ignore")


def test_a_dataframe_in_chunks_scores_as_one_request_would(server: Server) -> None:
    df = pd.concat([frame(40, 1), make_anomalies(5, seed=1)], ignore_index=True)
    df = df.drop(columns=["anomaly_kind", "transaction_id"], errors="ignore")
    with (
        Client(server.url, api_key=KEY, chunk_size=7) as small,
        Client(server.url, api_key=KEY, chunk_size=50) as whole,
    ):
        a, b = small.score(df, explain=2), whole.score(df, explain=2)
    assert len(a) == len(df) == len(b)
    # order kept across 7 chunks (float32 scores: onnxruntime's matrix products may round the
    # last bit differently for another batch size)
    assert [r.score for r in a] == pytest.approx([r.score for r in b], rel=1e-6)
    assert [r.is_anomaly for r in a] == [r.is_anomaly for r in b]
    assert any(r.is_anomaly for r in a[-5:]) and not all(r.is_anomaly for r in a[:40])
    assert all(r.model == "payments" and r.model_version for r in a)
    assert all(len(r.top_features) <= 2 for r in a)


def test_numpy_pandas_and_missing_values_are_sent_as_the_service_reads_them(
    server: Server,
) -> None:
    df = frame(6, 2)
    df["device"] = pd.Series([None, np.nan, "mobile", pd.NA, "web", None], dtype=object)
    df["tx_last_24h"] = df["tx_last_24h"].astype("int64")  # numpy int64 values
    records = df.to_dict(orient="records")
    plain = [
        {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in records
    ]
    with Client(server.url, api_key=KEY) as c:
        from_df = c.score(df)
        from_dicts = c.score(plain)
    assert [r.score for r in from_df] == pytest.approx([r.score for r in from_dicts])
    assert to_json_value(np.float32(1.5)) == 1.5 and to_json_value(np.bool_(True)) is True
    assert to_json_value(pd.NaT) is None and to_json_value(float("nan")) is None
    assert to_json_value(pd.Timestamp("2026-01-02T03:04:05Z")) == "2026-01-02T03:04:05+00:00"


def test_refusals_are_typed_and_name_the_record_in_the_callers_numbering(server: Server) -> None:
    df = frame(20, 3)
    records = df.to_dict(orient="records")
    records[13]["amount"] = {"nested": 1}  # cannot be a value of a numeric field
    with Client(server.url, api_key=KEY, chunk_size=5) as c, pytest.raises(RequestError) as e:
        c.score(records)
    assert e.value.status == 422
    assert [(x["record"], x["field"]) for x in e.value.errors] == [(13, "amount")]
    with Client(server.url, chunk_size=5) as anonymous, pytest.raises(AuthError) as a:
        anonymous.score(df)
    assert a.value.status == 401
    with Client(server.url, api_key="wrong-key-0123456789") as wrong, pytest.raises(AuthError):
        wrong.score(df)


def test_model_and_ready(server: Server) -> None:
    with Client(server.url, api_key=KEY) as c:
        assert c.ready()
        info = c.model()
    assert info["name"] == "payments" and info["features"]


def test_the_async_client_keeps_order_with_chunks_in_flight(server: Server) -> None:
    df = frame(45, 4)

    async def run() -> list[float | None]:
        async with AsyncClient(server.url, api_key=KEY, chunk_size=4, concurrency=6) as c:
            assert await c.ready()
            return [r.score for r in await c.score(df)]

    with Client(server.url, api_key=KEY) as c:
        expected = [r.score for r in c.score(df)]
    assert asyncio.run(run()) == expected


# ---------------------------------------------------------------- retries


class Flaky:
    """A listener that answers the first ``fails`` requests with 503 (as a proxy or a starting
    service does) and then forwards each request to the real service, counting requests."""

    def __init__(self, target: str, fails: int, status: int = 503) -> None:
        self.target, self.fails, self.status, self.seen = target, fails, status, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:])}
                length = int(headers.get("content-length", "0"))
                while len(body) < length:
                    body += conn.recv(65536)
                self.seen += 1
                if self.seen <= self.fails:
                    conn.sendall(
                        f"HTTP/1.1 {self.status} Busy\r\ncontent-length: 0\r\n"
                        "connection: close\r\n\r\n".encode()
                    )
                    continue
                method, path, _ = lines[0].split(" ")
                keep = {k: headers[k] for k in ("content-type", "authorization") if k in headers}
                r = httpx.request(method, self.target + path, content=body, headers=keep)
                conn.sendall(
                    f"HTTP/1.1 {r.status_code} OK\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(r.content)}\r\nconnection: close\r\n\r\n".encode()
                    + r.content
                )

    def close(self) -> None:
        self.sock.close()


def test_503s_are_retried_until_the_service_answers(server: Server) -> None:
    flaky = Flaky(server.url, fails=3)
    try:
        with Client(flaky.url, api_key=KEY, retries=5, backoff=0.01) as c:
            results = c.score(frame(3, 5))
        assert len(results) == 3 and flaky.seen == 4
    finally:
        flaky.close()


def test_retries_give_up_with_unavailable_and_4xx_is_never_retried(server: Server) -> None:
    flaky = Flaky(server.url, fails=100, status=502)
    try:
        with (
            Client(flaky.url, api_key=KEY, retries=2, backoff=0.01) as c,
            pytest.raises(Unavailable),
        ):
            c.score(frame(3, 6))
        assert flaky.seen == 3  # the first try and two retries
    finally:
        flaky.close()
    flaky = Flaky(server.url, fails=0)
    try:
        with Client(flaky.url, retries=5, backoff=0.01) as c, pytest.raises(AuthError):
            c.score(frame(3, 6))  # no key: 401, refused at once
        assert flaky.seen == 1
    finally:
        flaky.close()


def test_a_connection_refused_is_retried_until_the_service_comes_up(
    bundle_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    out: dict[str, object] = {}

    def call() -> None:
        try:
            with Client(f"http://127.0.0.1:{port}", retries=60, backoff=0.05, max_backoff=0.5) as c:
                out["results"] = c.score(frame(2, 7))
        except Exception as e:  # reported below
            out["error"] = e

    caller = threading.Thread(target=call)
    caller.start()
    # the service starts on that port only after the client has begun retrying
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp_path, port=port):
        caller.join(timeout=60)
    assert "error" not in out, out.get("error")
    assert len(out["results"]) == 2  # type: ignore[arg-type]
