"""The model explorer: latent-space files in the bundle, /v1/encode, /v1/decode, /v1/map,
explanations that point at the value, and bundles without the files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from playwright.sync_api import expect

from service.api import Model
from service.bundle import BundleError, NumericFeature, read_bundle
from service.features import encode_columns
from service.latent_manifest import MAX_MAP_POINTS
from service.scoring import Scorer
from tests.conftest import Server, chromium_page, records, run_server
from training.config import TrainConfig
from training.demo_data import generate_payments, labelled
from training.digits import digits_frame, pixel_names, train_digits
from training.train import train_bundle

KEY = "explorer-test-key-0123456789"
HEADERS = {"X-API-Key": KEY}


def normal_columns(n: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    recs = records(generate_payments(n, seed=seed))
    return recs, {k: [r.get(k) for r in recs] for k in recs[0]}


# ---------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def scorer(bundle_dir: Path) -> Scorer:
    s = Scorer(bundle_dir)
    s.warm_up()
    return s


def test_bundle_lists_and_hashes_the_latent_files(bundle_dir: Path, tmp_path: Path) -> None:
    m = read_bundle(bundle_dir).manifest
    assert m.explorer is not None
    assert (bundle_dir / m.explorer.posterior.file).is_file()
    assert m.explorer.max_rel_diff < 1e-3  # checked against torch at export
    assert len(m.explorer.sample.x) <= MAX_MAP_POINTS
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    with (copy / m.explorer.decoder.file).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(copy)


def test_decoding_the_encoding_lands_near_the_record(scorer: Scorer) -> None:
    lat = scorer.latent
    assert lat is not None
    _, cols = normal_columns(300, seed=11)
    inputs = encode_columns(scorer.manifest.features, cols).inputs
    post = lat.encode(inputs)
    assert post["mu"].shape == post["sigma"].shape == (300, lat.section.latent)
    assert post["map"].shape == (300, 2) and (post["sigma"] > 0).all()
    own = lat.decode(post["mu"])
    other = lat.decode(post["mu"][::-1])  # another record's encoding
    real = [f for f in scorer.manifest.features if isinstance(f, NumericFeature)]
    x = inputs["x_num"][:, : len(real)]
    present = ~np.isnan(x)
    inside = (own["num_lo"] <= x) & (x <= own["num_hi"])
    assert inside[present].mean() > 0.75  # a central 90% range holds most normal values
    scale = np.array([f.scale for f in real])
    err_own = np.nanmedian(np.abs(own["num_mean"] - x) / scale)
    err_other = np.nanmedian(np.abs(other["num_mean"] - x) / scale)
    assert err_own < err_other  # the decoding is of this record, not of any record


def test_map_points_lie_inside_the_bounds(scorer: Scorer) -> None:
    lat = scorer.latent
    assert lat is not None
    s = lat.section
    (x0, x1), (y0, y1) = s.bounds
    x, y = np.array(s.sample.x), np.array(s.sample.y)
    assert ((x0 <= x) & (x <= x1)).mean() > 0.98 and ((y0 <= y) & (y <= y1)).mean() > 0.98
    assert min(s.sample.percentile) >= 0 and max(s.sample.percentile) <= 100
    # a map point decodes to the latent point that maps back onto it
    pts = np.array([[x0, y0], [x1, y1], [(x0 + x1) / 2, (y0 + y1) / 2]])
    assert np.allclose(lat.to_map(lat.from_map(pts)), pts, atol=1e-6)


def test_report_shows_the_map_features_and_dropped_columns(bundle_dir: Path) -> None:
    page = (bundle_dir / "report.html").read_text()
    m = read_bundle(bundle_dir).manifest
    assert (bundle_dir / "latent.png").stat().st_size > 5000 and 'src="latent.png"' in page
    features = page[page.index("<table id='features'>") :]
    features = features[: features.index("</table>")]
    for f in m.features:
        assert f"<td>{f.name}</td>" in features
    assert features.count("inside the decoded 90% range") == sum(
        isinstance(f, NumericFeature) for f in m.features
    )
    dropped = page[page.index("<table id='dropped'>") :]
    assert "<td>transaction_id</td><td>excluded" in dropped[: dropped.index("</table>")]


def test_bulk_explanations_name_value_and_expectation(bundle_dir: Path) -> None:
    df = generate_payments(20, seed=8)
    df.loc[0, "distance_from_home_km"] = 12345.0
    out = Model.load(bundle_dir).score(df, explain=2)
    first = out["top_features"].iloc[0]
    assert first.startswith("distance_from_home_km:") and "(12345.0; expected " in first
    lo, hi = map(float, first.split(" in ")[1].split(")")[0].split(".."))
    assert lo < hi < 12345.0


@pytest.mark.slow
def test_labelled_anomalies_join_the_map_with_their_label(tmp_path: Path) -> None:
    cfg = TrainConfig(exclude=["transaction_id"], label_column="is_anomaly", epochs=3)
    r = train_bundle(labelled(1500, 60, seed=2), tmp_path / "b", cfg, source="l.csv",
                     data_fingerprint="l", progress=False)  # fmt: skip
    assert r.manifest.explorer is not None
    sample = r.manifest.explorer.sample
    assert sample.label_name == "label" and sample.label is not None
    assert sample.label.count("anomaly") == 60 and "normal" in sample.label
    anomalous = [
        p for p, lab in zip(sample.percentile, sample.label, strict=True) if lab != "normal"
    ]
    assert np.median(anomalous) > 90  # labelled anomalies score high among normal records


def test_an_image_that_does_not_fit_stops_training_early(tmp_path: Path) -> None:
    cfg = TrainConfig(exclude=["transaction_id"], image=[4, 4], epochs=1)
    with pytest.raises(ValueError, match="4x4 needs 16 feature columns, the data has 9"):
        train_bundle(generate_payments(300, seed=1), tmp_path / "b", cfg, source="p.csv",
                     data_fingerprint="p", progress=False)  # fmt: skip
    assert not (tmp_path / "b").exists()


def test_old_bundle_without_latent_files_still_scores(bundle_dir: Path, tmp_path: Path) -> None:
    old = strip_latent(bundle_dir, tmp_path / "old")
    s = Scorer(old)
    s.warm_up()
    assert s.latent is None
    _, cols = normal_columns(3, seed=2)
    assert len(s.score(cols, None).score) == 3


def test_a_map_that_does_not_fit_the_latent_space_is_refused(
    bundle_dir: Path, tmp_path: Path
) -> None:
    bad = edited_copy(
        bundle_dir, tmp_path / "bad", lambda m: m["explorer"]["map"]["mean"].append(0.0)
    )
    with pytest.raises(BundleError, match="latent map"):
        Scorer(bad)


def test_latent_outputs_that_do_not_fit_the_features_are_refused(
    bundle_dir: Path, tmp_path: Path
) -> None:
    def add_a_category(m: dict[str, Any]) -> None:
        cat = next(f for f in m["features"] if f["kind"] == "categorical")
        cat["categories"].append("a-category-the-graphs-never-had")

    s = Scorer(edited_copy(bundle_dir, tmp_path / "bad", add_a_category))
    with pytest.raises(BundleError, match="cat_p"):
        s.warm_up()


def edited_copy(src: Path, dest: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the bundle whose manifest ``edit`` has changed (its checksums still hold)."""
    shutil.copytree(src, dest)
    raw = json.loads((dest / "manifest.json").read_text())
    edit(raw)
    (dest / "manifest.json").write_text(json.dumps(raw))
    return dest


def strip_latent(src: Path, dest: Path) -> Path:
    """A copy of the bundle as training wrote it before the explorer: no latent files."""
    shutil.copytree(src, dest)
    raw = json.loads((dest / "manifest.json").read_text())
    for f in (raw["explorer"]["posterior"]["file"], raw["explorer"]["decoder"]["file"]):
        (dest / f).unlink()
    del raw["explorer"]
    (dest / "manifest.json").write_text(json.dumps(raw))
    return dest


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"VAE_ANOMALY_API_KEYS": KEY, "VAE_ANOMALY_MAX_RECORDS": "50"}
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp_path_factory.mktemp("x"), env) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30, headers=HEADERS) as c:
        yield c


@pytest.mark.slow
def test_encode_and_decode_over_http(client: httpx.Client, bundle_dir: Path) -> None:
    m = read_bundle(bundle_dir).manifest
    assert m.explorer is not None
    d = m.explorer.latent
    recs, _ = normal_columns(4, seed=3)
    r = client.post("/v1/encode", json={"records": recs})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 4 and all(len(x["mu"]) == d == len(x["sigma"]) for x in res)
    assert all(len(x["map"]) == 2 and len(x["map_cov"]) == 2 for x in res)
    r = client.post("/v1/decode", json={"latent": [x["mu"] for x in res]})
    assert r.status_code == 200, r.text
    dec = r.json()["results"]
    got, want = np.array([x["map"] for x in dec]), np.array([x["map"] for x in res])
    assert np.allclose(got, want, atol=1e-4)
    names = [f["name"] for f in dec[0]["features"]]
    assert names == [f.name for f in m.features]
    r = client.post("/v1/decode", json={"points": [[0.0, 0.0], [1.5, -2.0]]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


@pytest.mark.slow
def test_map_over_http(client: httpx.Client) -> None:
    r = client.get("/v1/map")
    assert r.status_code == 200, r.text
    body = r.json()
    (x0, x1), (y0, y1) = body["bounds"]
    assert x0 < x1 and y0 < y1
    pts = body["points"]
    assert 0 < len(pts["x"]) == len(pts["y"]) == len(pts["percentile"]) <= MAX_MAP_POINTS


@pytest.mark.slow
def test_top_features_carry_value_and_expectation(client: httpx.Client) -> None:
    rec = {
        **records(generate_payments(1, seed=5))[0],
        "distance_from_home_km": 9500.0,
        "country": "AQ",
    }
    r = client.post("/v1/score?explain=3", json={"records": [rec]})
    assert r.status_code == 200, r.text
    tops = {t["name"]: t for t in r.json()["results"][0]["top_features"]}
    far = tops["distance_from_home_km"]
    assert far["value"] == 9500.0
    lo, hi = far["range"]
    assert lo <= far["expected"] <= hi < 9500.0  # expected something nearer home
    if "country" in tops:
        assert tops["country"]["value"] == "AQ" and tops["country"]["expected"] != "AQ"
        assert 0 < tops["country"]["p"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "body",
    [
        {"points": [[0.0]]},
        {"points": [[0.0, "x"]]},
        {"points": [[0.0, 1e309]]},
        {"points": []},
        {"points": [[0.0, 0.0]] * 51},
        {"latent": [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]},
        {"points": [[0, 0]], "latent": [[0, 0]]},
        {"records": []},
        [1, 2],
    ],
)
def test_bad_decode_bodies_are_422(client: httpx.Client, body: Any) -> None:
    r = client.post(
        "/v1/decode", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["errors"]


@pytest.mark.slow
def test_bad_records_and_bodies_are_4xx(client: httpx.Client) -> None:
    recs, _ = normal_columns(1, seed=4)
    r = client.post("/v1/encode", json={"records": [{**recs[0], "amount": "lots"}]})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "amount"
    r = client.post("/v1/encode", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/v1/decode", content=b"[]", headers={"content-type": "text/plain"})
    assert r.status_code == 415


@pytest.mark.slow
def test_endpoints_need_the_key_and_the_page_does_not(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/v1/map").status_code == 401
        assert c.post("/v1/decode", json={"points": [[0, 0]]}).status_code == 401
        assert c.post("/v1/encode", json={"records": []}).status_code == 401
        page = c.get("/explorer")
        assert page.status_code == 200 and "<canvas" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert c.get("/explorer/explorer.js").status_code == 200
        assert c.get("/explorer/..%2Fbundle.py").status_code == 404
        spec = c.get("/openapi.json").json()["paths"]
        assert {"/v1/encode", "/v1/decode", "/v1/map"} <= set(spec)


@pytest.mark.slow
def test_old_bundle_answers_409(bundle_dir: Path, tmp_path: Path) -> None:
    old = strip_latent(bundle_dir, tmp_path / "old")
    with run_server(["serve", "--bundle", str(old)], tmp_path) as s:
        r = httpx.get(f"{s.url}/v1/map")
        assert r.status_code == 409 and "retrain" in r.json()["error"]
        recs, _ = normal_columns(1, seed=6)
        r = httpx.post(f"{s.url}/v1/score", json={"records": recs})
        assert r.status_code == 200
        assert all("expected" not in t for t in r.json()["results"][0]["top_features"])


# ---------------------------------------------------------------- the page, in a browser

SHOTS = Path(__file__).resolve().parent.parent / "docs" / "img"


def drawn_pixels(page: Any, canvas: str) -> int:
    """Pixels of a canvas that are not the white background."""
    return int(
        page.evaluate(
            """(id) => { const c = document.getElementById(id);
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 0; i < d.length; i += 4)
              if (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250) n++;
            return n; }""",
            canvas,
        )
    )


def explore(url: str, shot: Path, key: str | None = None) -> None:
    """Open the page, check the map drew, hovering decodes, the form scores; screenshot."""
    with chromium_page() as (page, urls):
        page.goto(f"{url}/explorer")
        if key is not None:
            page.wait_for_selector("#keyform:not([hidden])")
            page.fill("#key", key)
            page.click("#keyform button")
        page.wait_for_selector("#decoded table", state="attached")
        assert drawn_pixels(page, "map") > 500
        box = page.locator("#map").bounding_box()
        assert box is not None
        seen = []
        for fx, fy in ((0.2, 0.3), (0.8, 0.7)):
            before = page.inner_text("#where")
            page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
            expect(page.locator("#where")).not_to_have_text(before)
            seen.append(page.text_content("#decoded"))
        assert seen[0] != seen[1]  # the decoded panel follows the cursor
        page.click("#record button")
        page.wait_for_selector("#verdict .verdict")
        assert page.inner_text("#verdict .verdict") in ("Normal", "Anomaly")
        page.screenshot(path=str(shot), full_page=True)
        outside = [u for u in urls if not u.startswith(url)]
        assert not outside, outside


@pytest.mark.slow
def test_payments_page_in_a_browser(server: Server, tmp_path: Path) -> None:
    explore(server.url, tmp_path / "explorer-payments.png", key=KEY)


# ---------------------------------------------------------------- the digits demo


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits(tmp_path_factory.mktemp("digits") / "digits", epochs=20, progress=False)


@pytest.mark.slow
def test_noise_and_inverted_digits_are_anomalies(digits_dir: Path) -> None:
    s = Scorer(digits_dir)
    s.warm_up()
    names = [f.name for f in s.manifest.features]
    px = digits_frame()[pixel_names()].to_numpy()

    def scored(a: np.ndarray) -> Any:
        cols = dict(zip(pixel_names(), a.T.tolist(), strict=True))
        return s.score({n: cols[n] for n in names}, None)

    rng = np.random.default_rng(7)
    noise = rng.uniform(0, 16, size=(25, 64)).round()
    inverted = 16 - px[rng.permutation(len(px))[:25]]
    assert scored(noise).is_anomaly.all()
    assert scored(inverted).is_anomaly.all()
    assert scored(px[:300]).is_anomaly.mean() < 0.05  # the digits themselves are normal
    m = s.manifest.explorer
    assert m is not None and m.latent == 2 and m.map.kind == "identity"
    assert m.image is not None and (m.image.width, m.image.height) == (8, 8)
    assert set(m.sample.label or []) == {str(d) for d in range(10)}
    assert "digit" not in names  # the class colors the map; the model never sees it


@pytest.mark.slow
def test_demo_digits_page_in_a_browser(digits_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(digits_dir, home / "demo" / "digits")  # what `demo --digits` trained before
    env = {"VAE_ANOMALY_HOME": str(home)}
    with run_server(["demo", "--digits", "--quiet"], tmp_path, env=env) as s:
        assert httpx.get(f"{s.url}/v1/model").json()["name"] == "demo-digits"
        explore(s.url, tmp_path / "explorer-digits.png")
        with chromium_page() as (page, _):
            page.goto(f"{s.url}/explorer")
            page.wait_for_selector("#decoded table", state="attached")
            assert drawn_pixels(page, "image") > 100  # a decoded digit, drawn as an image
