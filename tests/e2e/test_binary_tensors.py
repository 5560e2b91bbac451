"""Binary tensors against a real server, sent by ``tritonclient.http`` at its defaults (binary
inputs, binary outputs): a few records and many (decoded as numbers, then as arrays) score as
``/v1/score`` scores them; NaN in a typed array is a 400 naming the input; values training
never saw are scored, flagged and named; the server keeps answering after all of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from service.bundle import Manifest, read_bundle
from tests.conftest import Server, records, run_server
from training.demo_data import generate_payments, make_anomalies


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["serve", "--bundle", str(bundle_dir)]
    with run_server(args, tmp_path_factory.mktemp("binary")) as s:
        yield s


@pytest.fixture(scope="module")
def manifest(bundle_dir: Path) -> Manifest:
    return read_bundle(bundle_dir).manifest


def payments(n: int, seed: int) -> pd.DataFrame:
    """Normal and anomalous payments with a value in every field (no null in binary data)."""
    df = pd.concat([generate_payments(n - n // 4, seed), make_anomalies(n // 4, seed)])
    df = df.drop(columns="anomaly_kind").reset_index(drop=True)
    return df.fillna({"device": "mobile", "distance_from_home_km": 0.0, "customer_age": 40.0})


def inputs(df: pd.DataFrame, m: Manifest) -> list[thttp.InferInput]:
    """One tensor per feature, typed as numpy holds the frame: FP64, BOOL, BYTES."""
    out = []
    for f in m.features:
        if f.kind == "numeric":
            arr, dt = df[f.name].to_numpy(np.float64), "FP64"
        elif f.kind == "boolean":
            arr, dt = df[f.name].to_numpy(bool), "BOOL"
        else:
            arr, dt = df[f.name].astype(str).to_numpy(object), "BYTES"
        t = thttp.InferInput(f.name, [len(df)], dt)
        t.set_data_from_numpy(arr)  # binary_data=True: the default
        out.append(t)
    return out


def client(server: Server) -> thttp.InferenceServerClient:
    return thttp.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.mark.parametrize("n", [3, 500])
def test_tritonclient_at_its_defaults_scores_as_the_native_api(
    server: Server, manifest: Manifest, n: int
) -> None:
    df = payments(n, seed=91)
    result = client(server).infer(manifest.name, inputs(df, manifest))
    r = httpx.post(f"{server.url}/v1/score", json={"records": records(df)}, timeout=30)
    assert r.status_code == 200, r.text
    expected = r.json()["results"]
    np.testing.assert_allclose(result.as_numpy("score"), [x["score"] for x in expected], rtol=1e-6)
    assert result.as_numpy("is_anomaly").tolist() == [x["is_anomaly"] for x in expected]
    assert all("data" not in o for o in result.get_response()["outputs"])  # binary outputs


def test_nan_in_a_typed_array_is_a_400_naming_the_input(server: Server, manifest: Manifest) -> None:
    df = payments(20, seed=92)
    df.loc[17, "distance_from_home_km"] = np.nan
    with pytest.raises(InferenceServerException) as e:
        client(server).infer(manifest.name, inputs(df, manifest))
    assert e.value.status() == "400"
    assert "'distance_from_home_km'[17]" in str(e.value) and "finite" in str(e.value)


def test_values_never_seen_are_scored_flagged_and_named(server: Server, manifest: Manifest) -> None:
    df = payments(30, seed=93)
    df.loc[4, "merchant_category"] = "orbital_casino"
    df.loc[22, "tx_last_24h"] = 1e6
    result = client(server).infer(manifest.name, inputs(df, manifest))
    flagged = result.as_numpy("is_anomaly")
    assert flagged[4] and flagged[22]
    unusual = result.get_response()["parameters"]["unusual_values"]
    named = {(u["index"], u["field"], u["kind"], u["value"]) for u in unusual}
    assert (4, "merchant_category", "unseen_category", "orbital_casino") in named
    assert (22, "tx_last_24h", "out_of_range", 1e6) in named


def test_the_server_answers_after_hostile_bodies(server: Server, manifest: Manifest) -> None:
    """Valid JSON parts over tails cut, padded and corrupted: each a 400 (never a 500), and the
    next honest request is answered."""
    df = payments(8, seed=94)
    ts = inputs(df, manifest)
    body, header_length = thttp.InferenceServerClient.generate_request_body(ts)
    assert header_length is not None
    url = f"{server.url}/v2/models/{manifest.name}/infer"
    rng = np.random.default_rng(94)
    tails = {
        "cut": body[:-5],
        "padded": body + b"\0" * 7,
        "header past the body": body,
        "a BOOL byte of 9": body,
    }
    for name, content in tails.items():
        length = str(len(body) + 1 if name == "header past the body" else header_length)
        if name == "a BOOL byte of 9":  # the first BOOL byte, after the FP64 tensors before it
            before = next(i for i, f in enumerate(manifest.features) if f.kind == "boolean")
            assert all(f.kind == "numeric" for f in manifest.features[:before])
            pos = header_length + 8 * 8 * before
            content = content[:pos] + b"\x09" + content[pos + 1 :]
        r = httpx.post(url, content=content, headers={"Inference-Header-Content-Length": length})
        assert r.status_code == 400, (name, r.text)
    for _ in range(40):  # random bytes flipped in the tail
        noisy = bytearray(body)
        at = rng.integers(header_length, len(body), 3)
        noisy[at[0]], noisy[at[1]], noisy[at[2]] = rng.integers(0, 256, 3).tolist()
        r = httpx.post(
            url,
            content=bytes(noisy),
            headers={"Inference-Header-Content-Length": str(header_length)},
        )
        assert r.status_code in (200, 400), r.text
    result = client(server).infer(manifest.name, ts)
    assert len(result.as_numpy("score")) == 8
