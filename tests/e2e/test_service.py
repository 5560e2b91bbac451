"""The scoring service as a real uvicorn process on 127.0.0.1, where it takes one: several
workers summing their metrics, concurrent connections sharing onnxruntime calls, and the metrics
a process sets from the model it serves. The rest of
the API is tested in process (tests/service/test_app.py)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from service.bundle import read_bundle
from service.features import encode_columns
from service.runtime import open_bundle
from tests.conftest import Server, metric_samples, records, run_server, value
from training.demo_data import generate_payments, make_anomalies


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp_path_factory.mktemp("srv")) as s:
        yield s


def test_the_model_served_sets_the_gauges_and_the_score_buckets(
    server: Server, bundle_dir: Path
) -> None:
    """What a process learns from the first model it loads (the score histogram's buckets
    cannot change while it lives): checked on a fresh server, after one request."""
    m = read_bundle(bundle_dir).manifest
    with httpx.Client(base_url=server.url, timeout=30) as c:
        recs = records(generate_payments(3, seed=40))
        assert c.post("/v1/score", json={"records": recs}).status_code == 200
        after = metric_samples(c)
        assert (
            value(
                after,
                "vae_anomaly_model_info",
                name=m.name,
                version=m.version,
                score_type=m.default_score,
            )
            == 1
        )
        thr = m.thresholds[m.default_score].value
        assert value(after, "vae_anomaly_threshold") == pytest.approx(thr)
        assert value(after, "vae_anomaly_model_reloads_total", result="success") == 1
        # the score histogram has buckets on both sides of the threshold
        les = sorted(float(dict(k[1])["le"]) for k in after if k[0] == "vae_anomaly_score_bucket")
        assert sum(le < thr for le in les) >= 5 and sum(thr < le < math.inf for le in les) >= 5
        assert any(le == pytest.approx(thr, rel=1e-5) for le in les)


def test_metrics_add_up_across_two_workers(bundle_dir: Path, tmp_path: Path) -> None:
    mp = tmp_path / "prom"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(mp), "VAE_ANOMALY_UNKNOWN_FIELDS": "ignore"}
    with run_server(
        ["serve", "--bundle", str(bundle_dir), "--workers", "2"], tmp_path, env=env
    ) as s:
        recs = records(generate_payments(3, seed=41))
        recs[0]["favourite_colour"] = "blue"  # ignored by this server's setting

        def post(_: int) -> int:
            # a new connection each time, so the kernel spreads them over the workers
            with httpx.Client(base_url=s.url, timeout=30) as c:
                return c.post("/v1/score", json={"records": recs}).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(post, range(60)))
        assert statuses == [200] * 60
        with httpx.Client(base_url=s.url, timeout=30) as c:
            samples = metric_samples(c)
        pids = {p.stem.rsplit("_", 1)[-1] for p in mp.glob("counter_*.db")}
        assert len(pids) >= 2, "each worker writes its own samples"
        assert value(samples, "vae_anomaly_records_scored_total") == 180
        assert (
            value(
                samples,
                "vae_anomaly_http_requests_total",
                method="POST",
                route="/v1/score",
                status="200",
            )
            == 60
        )
        # concurrent requests may share an onnxruntime call (micro-batching)
        assert 1 <= value(samples, "vae_anomaly_batch_size_count") <= 60
        assert value(samples, "vae_anomaly_batch_size_sum") == 180
        assert value(samples, "vae_anomaly_score_count") == 180
        # each worker loaded the model once: /metrics (answered by one worker) sums both
        assert value(samples, "vae_anomaly_model_reloads_total", result="success") == 2


def test_concurrent_requests_share_calls_and_each_gets_its_own_answer(
    server: Server, bundle_dir: Path
) -> None:
    df = pd.concat([generate_payments(60, seed=42), make_anomalies(20, seed=42)], ignore_index=True)
    recs = records(df)
    bundle, model = open_bundle(bundle_dir)
    feats = bundle.manifest.features
    expected = model.run(
        encode_columns(feats, {f.name: df[f.name].to_numpy() for f in feats}).inputs
    )["elbo"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        before = metric_samples(c)

    def post(i: int) -> tuple[int, int, Any]:
        body = {"records": [recs[i]]} if i % 10 else {"records": [{**recs[i], "amount": "x"}]}
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/score", json=body)
            return i, r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, range(len(recs))))
    for i, status, body in answers:
        if i % 10 == 0:  # a bad record fails only its own request
            assert status == 422 and body["errors"][0]["field"] == "amount"
        else:
            assert status == 200
            assert body["results"][0]["score"] == pytest.approx(float(expected[i]), rel=1e-5)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        after = metric_samples(c)
    calls = value(after, "vae_anomaly_batch_size_count") - value(
        before, "vae_anomaly_batch_size_count"
    )
    scored = value(after, "vae_anomaly_batch_size_sum") - value(
        before, "vae_anomaly_batch_size_sum"
    )
    assert scored == 72
    assert calls < 72, "no two concurrent requests shared an onnxruntime call"
