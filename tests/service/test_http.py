"""What every HTTP request goes through (service/middleware.py), the documentation pages served
offline (service/openapi.py) and the metrics the service counts around the scorer. In process
(the app driven through its ASGI interface), except the browser test, which needs a server."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.types import ASGIApp, Receive, Scope, Send

from service import logs
from service.app import create_app
from service.bundle import read_bundle
from service.scoring import Scorer
from service.settings import Settings
from tests.conftest import (
    BrowserPage,
    InProcess,
    metric_samples,
    records,
    run_server,
    v2_body,
    value,
)
from training.demo_data import generate_payments


@pytest.fixture(scope="module")
def client(bundle_dir: Path) -> Iterator[httpx.Client]:
    with InProcess(create_app(Settings(bundle=bundle_dir, log_level="warning"))) as c:
        yield c


def example_body(client: httpx.Client) -> dict[str, Any]:
    spec = client.get("/openapi.json").json()
    body: dict[str, Any] = spec["paths"]["/v1/score"]["post"]["requestBody"]["content"][
        "application/json"
    ]["example"]
    return body


# ---------------------------------------------------------------- the middleware stack


class Recorder:
    """A middleware added after create_app: records what it sees, and the request id set then."""

    def __init__(self, app: ASGIApp, seen: list[tuple[str, str, int]]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = []

        async def spy(message: Any) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        rid = logs.request_id.get()
        await self.app(scope, receive, spy)
        self.seen.append((scope["path"], rid, status[0]))


def test_added_middleware_sees_the_hot_paths_and_none_is_added_once_started(
    bundle_dir: Path,
) -> None:
    m = read_bundle(bundle_dir).manifest
    app = create_app(Settings(bundle=bundle_dir, log_level="warning"))
    seen: list[tuple[str, str, int]] = []
    app.add_middleware(Recorder, seen=seen)
    rec = records(generate_payments(1, seed=3))[0]
    v2_path = f"/v2/models/{m.name}/infer"
    with InProcess(app) as c:
        r1 = c.post("/v1/score", json={"records": [rec]}, headers={"X-Request-ID": "rid-1"})
        r2 = c.post(v2_path, json=v2_body(bundle_dir, rec))
        r3 = c.post(f"/v2/models/{m.name}/versions/{m.version}/infer", json={"inputs": 1})
        r4 = c.get("/healthz")
        assert [r.status_code for r in (r1, r2, r3, r4)] == [200, 200, 400, 200]
        # inside the request id middleware: the id is already set when it runs
        assert seen == [
            ("/v1/score", "rid-1", 200),
            (v2_path, r2.headers["x-request-id"], 200),
            (f"/v2/models/{m.name}/versions/{m.version}/infer", r3.headers["x-request-id"], 400),
            ("/healthz", r4.headers["x-request-id"], 200),
        ]
        with pytest.raises(RuntimeError, match="after an application has started"):
            app.add_middleware(Recorder, seen=seen)


def test_timeout_and_unknown_paths_go_through_the_middleware(bundle_dir: Path) -> None:
    app = create_app(Settings(bundle=bundle_dir, log_level="warning", request_timeout=1e-9))
    with InProcess(app) as c:
        rec = records(generate_payments(1, seed=4))[0]
        r = c.post("/v1/score", json={"records": [rec]})  # scoring waits: the timeout strikes
        assert r.status_code == 503 and "took over" in r.json()["error"]
        assert r.headers["x-request-id"]
    app = create_app(Settings(bundle=bundle_dir, log_level="warning"))
    with InProcess(app) as c:
        r = c.get("/no/such/path", headers={"X-Request-ID": "lost-1"})
        assert r.status_code == 404 and r.headers["x-request-id"] == "lost-1"


# ---------------------------------------------------------------- documentation and labels


def test_documentation_routes_are_labelled_by_their_paths(client: httpx.Client) -> None:
    before = metric_samples(client)
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/static/swagger-ui.css"):
        assert client.get(path).status_code == 200, path
    assert client.get("/docs/static/../../settings.py").status_code == 404
    assert client.get("/docs/static/nope.js").status_code == 404
    after = metric_samples(client)

    def delta(route: str, status: str = "200") -> float:
        labels = {"method": "GET", "route": route, "status": status}
        return value(after, "vae_anomaly_http_requests_total", **labels) - value(
            before, "vae_anomaly_http_requests_total", **labels
        )

    for route in ("/docs", "/redoc", "/openapi.json"):
        assert delta(route) == 1, route
    assert delta("/docs/static/{name}") == 1
    assert delta("/docs/static/{name}", "404") == 1  # the name is a parameter, not a label
    assert delta("unmatched", "404") == 1  # "../.." left the static folder's route
    assert delta("unmatched") == 0


def test_documentation_pages_load_nothing_from_elsewhere(client: httpx.Client) -> None:
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        html = r.text
        assert "default-src 'self'" in r.headers["content-security-policy"]  # nor its scripts
        assert not re.search(r"https?://", html), page  # no CDN, no fonts, no validator
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and all(a.startswith("/docs/static/") for a in assets), assets
        for a in assets:
            r = client.get(a)
            assert r.status_code == 200 and len(r.content) > 500, a
            kind = "javascript" if a.endswith(".js") else "css" if a.endswith(".css") else "png"
            assert kind in r.headers["content-type"], a
            # nor does a vendored script fetch anything from a CDN once it runs
            assert not re.search(rb"https?://cdn\.", r.content), a


def test_the_openapi_example_scores_as_it_is(client: httpx.Client, bundle_dir: Path) -> None:
    m = read_bundle(bundle_dir).manifest
    body = example_body(client)
    [rec] = body["records"]
    assert set(rec) == {f.name for f in m.features}  # every field, and nothing else
    r = client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    assert result["unusual_values"] == [] and result["unknown_categories"] == []
    assert result["percentile"] < 99  # a typical record, not an anomaly


# ---------------------------------------------------------------- metrics around the scorer


def test_the_score_histogram_counts_each_scored_record(client: httpx.Client) -> None:
    recs = records(generate_payments(40, seed=17))
    before = metric_samples(client)
    r = client.post("/v1/score", json={"records": recs})
    assert r.status_code == 200
    scores = [x["score"] for x in r.json()["results"]]
    after = metric_samples(client)
    bounds = sorted(
        float(dict(k[1])["le"])
        for k in after
        if k[0] == "vae_anomaly_score_bucket" and dict(k[1])["le"] != "+Inf"
    )
    assert len(bounds) > 5
    for le in bounds:
        label = repr(le) if le != int(le) else f"{le:.1f}"
        got = value(after, "vae_anomaly_score_bucket", le=label) - value(
            before, "vae_anomaly_score_bucket", le=label
        )
        assert got == sum(s <= le for s in scores), le
    assert value(after, "vae_anomaly_score_bucket", le="+Inf") - value(
        before, "vae_anomaly_score_bucket", le="+Inf"
    ) == len(scores)
    total = value(after, "vae_anomaly_score_sum")
    got_sum = total - value(before, "vae_anomaly_score_sum")
    # the running sum holds every earlier test's scores too: a difference of two large floats
    # is exact to a few units in the last place of the total, not of this request's sum
    assert got_sum == pytest.approx(sum(scores), rel=1e-9, abs=4 * len(scores) * math.ulp(total))


def test_the_scorer_alone_counts_nothing(bundle_dir: Path) -> None:
    """Scoring is counted by the service (micro-batcher, large requests), not by the scorer:
    library users (service.api, bulk scoring) leave the metrics alone."""
    scorer = Scorer(bundle_dir)
    recs = records(generate_payments(5, seed=8))
    names = ["vae_anomaly_records_scored_total", "vae_anomaly_inference_seconds_count"]
    before = [REGISTRY.get_sample_value(n) or 0.0 for n in names]
    cols = {f.name: [r.get(f.name) for r in recs] for f in scorer.manifest.features}
    assert len(scorer.score(cols, None).score) == 5
    assert [REGISTRY.get_sample_value(n) or 0.0 for n in names] == before


# ---------------------------------------------------------------- in a browser, offline


@pytest.mark.slow
def test_docs_render_in_a_browser_with_no_network(
    bundle_dir: Path, tmp_path: Path, browser_page: BrowserPage
) -> None:
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp_path) as server:
        page = browser_page.page
        page.goto(f"{server.url}/docs")
        op = page.locator(".opblock-post", has_text="/v1/score").first
        op.wait_for(state="visible", timeout=30_000)
        # "Try it out" with the schema's example, as it comes
        op.locator(".opblock-summary").click()
        op.get_by_role("button", name="Try it out").click()
        op.get_by_role("button", name="Execute").click()
        status = op.locator(".live-responses-table tr.response .response-col_status").first
        status.wait_for(state="visible", timeout=30_000)
        assert status.inner_text().strip() == "200"
        page.goto(f"{server.url}/redoc")
        heading = page.locator("h2", has_text="Score records").first  # the operation's section
        heading.wait_for(state="visible", timeout=30_000)
        assert page.get_by_text("/v1/score", exact=True).count() > 0
    assert browser_page.blocked == []
