"""Drift monitoring end to end: the real service scraped by a real Prometheus running the
shipped drift rules (over a short window), which compute the PSI from the live counters and
fire for the drifted feature only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.bundle import (
    read_bundle,
)
from tests.conftest import (
    PROM,
    drift_json,
    grocery_heavy,
    prometheus_query,
    records,
    run_server,
    shifted_age,
    wait_until,
)
from training.demo_data import generate_payments

WINDOW = "20s"  # the shipped rules use 1 h; the same rules over 20 s, alerts after 2 s


def short_window_rules() -> str:
    text = (PROM / "rules.yml").read_text()
    assert text.count("[1h]") >= 2 and text.count("for: 30m") >= 3
    return text.replace("[1h]", f"[{WINDOW}]").replace("for: 30m", "for: 2s")


def psi_now(prom: str) -> dict[str, float]:
    got = prometheus_query(prom, "vae_anomaly:feature_psi:1h")
    return {r["metric"]["feature"]: float(r["value"][1]) for r in got}


def firing(prom: str) -> set[str]:
    got = prometheus_query(prom, 'ALERTS{alertname="VaeAnomalyFeatureDrift", alertstate="firing"}')
    return {r["metric"]["feature"] for r in got}


def send_until(c: httpx.Client, prom: str, make: Any, done: Any, timeout: float = 90.0) -> None:
    """Send batches of ``make(seed)`` records until ``done()`` holds."""
    deadline = time.monotonic() + timeout
    seed = 1000
    while not done():
        assert time.monotonic() < deadline, f"timed out; PSI {psi_now(prom)}, firing {firing(prom)}"
        for _ in range(4):
            seed += 1
            r = c.post("/v1/score", json={"records": records(make(seed))})
            assert r.status_code == 200
            time.sleep(0.1)


def test_prometheus_computes_psi_and_fires_for_the_drifted_feature_only(
    bundle_dir: Path, tmp_path: Path, prometheus_on: Any
) -> None:
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp_path) as s:
        prom = prometheus_on(s.url.removeprefix("http://"), short_window_rules())
        wait_until(
            lambda: prometheus_query(prom, 'up{job="vae-anomaly"} == 1'),
            'up{job="vae-anomaly"} == 1',
            timeout=30,
            every=0.5,
        )
        time.sleep(2.5)  # scrapes of the zero counters before any traffic
        stationary = generate_payments(6000, seed=77)
        with httpx.Client(base_url=s.url, timeout=30) as c:
            for lo in range(0, 6000, 300):
                part = stationary.iloc[lo : lo + 300]
                assert c.post("/v1/score", json={"records": records(part)}).status_code == 200
            wait_until(
                lambda: prometheus_query(prom, "sum(vae_anomaly_score_values_total) == 6000"),
                "sum(vae_anomaly_score_values_total) == 6000",
                timeout=30,
                every=0.5,
            )
            time.sleep(2.5)  # the rules evaluate
            live = psi_now(prom)
            assert set(live) == {f.name for f in read_bundle(bundle_dir).manifest.features}
            assert max(live.values()) < 0.1, live
            # the offline command on the same records gives the same PSI
            stationary.to_json(tmp_path / "sent.jsonl", orient="records", lines=True)
            offline = drift_json(bundle_dir, tmp_path / "sent.jsonl", tmp_path)
            for f in offline["features"]:
                assert f["psi"] == pytest.approx(live[f["feature"]], abs=1e-6), f
            score = prometheus_query(prom, "vae_anomaly:score_psi:1h")
            assert float(score[0]["value"][1]) == pytest.approx(offline["score"]["psi"], abs=1e-6)
            assert firing(prom) == set()

            # customers one standard deviation older: that feature, and only it
            send_until(
                c,
                prom,
                lambda seed: shifted_age(generate_payments(300, seed)),
                lambda: firing(prom),
            )
            assert firing(prom) == {"customer_age"}
            over = {f for f, v in psi_now(prom).items() if v > 0.2}
            assert over == {"customer_age"}

            # ages back to normal, the merchant mix changes: that feature fires, age clears
            send_until(
                c,
                prom,
                lambda seed: grocery_heavy(generate_payments(300, seed), seed),
                lambda: (
                    firing(prom) == {"merchant_category"} and psi_now(prom)["customer_age"] < 0.1
                ),
            )
            now = psi_now(prom)
            assert now["merchant_category"] > 0.2 and now["customer_age"] < 0.1, now
