"""Binary V2 requests through the app in process (fast tier). Numbers and booleans are decoded
array-wide and score as the same request sent as JSON; hostile payloads (lies in the header and
the sizes, wrong shapes and datatypes, NaN and infinity, bad BOOL bytes, broken BYTES) get a 400
naming the input and the reason; values training never saw are scored, flagged and named."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest

from service import v2_binary
from service.bundle import Manifest, read_bundle
from service.settings import Settings
from service.v2_request import parse
from tests.conftest import InProcess, in_process
from training.demo_data import generate_payments, make_anomalies

Tensor = tuple[dict[str, Any], bytes]
HEADER = "inference-header-content-length"


@pytest.fixture(scope="module")
def client(bundle_dir: Path) -> Iterator[InProcess]:
    with in_process(bundle_dir) as c:
        yield c


@pytest.fixture(scope="module")
def manifest(bundle_dir: Path) -> Manifest:
    return read_bundle(bundle_dir).manifest


def tensor(name: str, dt: str, values: Any, shape: list[int] | None = None) -> Tensor:
    """A binary input: its JSON description and its bytes (BYTES: str or raw bytes each)."""
    if dt == "BYTES":
        raw = [v.encode() if isinstance(v, str) else v for v in values]
        blob = b"".join(struct.pack("<I", len(b)) + b for b in raw)
    else:
        blob = np.asarray(values, v2_binary.DTYPES[dt]).tobytes()
    t = {"name": name, "datatype": dt, "shape": shape or [len(values)]}
    return t | {"parameters": {"binary_data_size": len(blob)}}, blob


def body(tensors: list[Tensor], **top: Any) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps({"inputs": [t for t, _ in tensors], **top})
    headers = {HEADER: str(len(head)), "content-type": "application/octet-stream"}
    return head + b"".join(b for _, b in tensors), headers


def payments(n: int, seed: int) -> pd.DataFrame:
    """Normal and anomalous payments with no missing value (a binary tensor has no null)."""
    df = pd.concat([generate_payments(n - n // 3, seed), make_anomalies(n // 3, seed)])
    df = df.drop(columns="anomaly_kind").reset_index(drop=True)
    return df.fillna({"device": "mobile", "distance_from_home_km": 0.0, "customer_age": 40})


# each numeric feature in another datatype than FP64, as a client with typed arrays sends them
DATATYPES = {"amount": "FP32", "hour": "INT8", "customer_age": "UINT16", "tx_last_24h": "INT64"}


def tensors(df: pd.DataFrame, m: Manifest) -> list[Tensor]:
    out = []
    for f in m.features:
        if f.kind == "categorical":
            out.append(tensor(f.name, "BYTES", df[f.name].astype(str).tolist()))
        elif f.kind == "boolean":
            out.append(tensor(f.name, "BOOL", df[f.name].astype(bool).to_numpy()))
        else:
            out.append(tensor(f.name, DATATYPES.get(f.name, "FP64"), df[f.name].to_numpy()))
    return out


def as_json(ts: list[Tensor]) -> dict[str, Any]:
    """The same request with JSON data (the values exactly as the bytes hold them)."""
    inputs = []
    for t, blob in ts:
        data = v2_binary.decode_tensor(t["name"], t["datatype"], blob, t["shape"][0])
        values = data.tolist() if isinstance(data, np.ndarray) else data
        inputs.append({k: v for k, v in t.items() if k != "parameters"} | {"data": values})
    return {"inputs": inputs}


def outputs(r: Any) -> dict[str, np.ndarray]:
    """A response's outputs by name, binary (as the header says) or JSON."""
    length = r.headers.get(HEADER)
    head = orjson.loads(r.content[: int(length)] if length else r.content)
    out, pos = {}, int(length or 0)
    for o in head["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.asarray(o["data"])
            continue
        out[o["name"]] = np.frombuffer(r.content[pos : pos + size], v2_binary.DTYPES[o["datatype"]])
        pos += size
    assert pos == (len(r.content) if length else 0)  # every byte read
    return out


def infer(client: InProcess, m: Manifest, content: Any, headers: dict[str, str]) -> Any:
    return client.post(f"/v2/models/{m.name}/infer", content=content, headers=headers)


def test_binary_tensors_score_as_the_same_request_in_json(
    client: InProcess, manifest: Manifest
) -> None:
    ts = tensors(payments(40, seed=81), manifest)
    content, headers = body(ts, parameters={"binary_data_output": True})
    binary = infer(client, manifest, content, headers)
    assert binary.status_code == 200, binary.text
    assert binary.headers["content-type"] == v2_binary.OCTET_STREAM
    json_r = client.post(f"/v2/models/{manifest.name}/infer", json=as_json(ts))
    assert json_r.status_code == 200, json_r.text
    got, want = outputs(binary), outputs(json_r)
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-6)
    np.testing.assert_allclose(got["percentile"], want["percentile"], rtol=1e-6)
    assert got["is_anomaly"].tolist() == want["is_anomaly"].tolist()
    assert got["is_anomaly"].any() and not got["is_anomaly"].all()


@pytest.mark.parametrize("n", [1, 7, v2_binary.FEW + 1, 300])
def test_the_fast_path_gives_what_the_closer_look_gives(
    manifest: Manifest, bundle_dir: Path, n: int
) -> None:
    """Inputs in their usual form are decoded in one pass; any other (here a tensor with one
    more parameter) by the general decoder and the parser: the same values, of the same types.
    Beyond a few records, numbers and booleans stay arrays (no Python object per value)."""
    settings = Settings(bundle=bundle_dir)
    ts = tensors(payments(n, seed=82), manifest)
    content, headers = body(ts)
    fast, split = v2_binary.split_request(content, headers[HEADER])
    assert (
        v2_binary.fast_columns(fast["inputs"], content, split, {"amount": "numeric"}, 9, n) is None
    )
    slow_ts = [(t | {"parameters": t["parameters"] | {"note": "x"}}, b) for t, b in ts]
    slow_content, slow_headers = body(slow_ts)
    slow, slow_split = v2_binary.split_request(slow_content, slow_headers[HEADER])
    a = parse(fast, manifest, settings, (content, split))[0]
    b = parse(slow, manifest, settings, (slow_content, slow_split))[0]
    assert a.keys() == b.keys()
    for k in a:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
        assert np.asarray(a[k]).tolist() == np.asarray(b[k]).tolist(), k
    arrays = n > v2_binary.FEW
    assert isinstance(a["amount"], np.ndarray) == arrays and a["amount"][0] == b["amount"][0]
    assert isinstance(a["card_present"], np.ndarray) == arrays


def _set(ts: list[Tensor], name: str, new: Tensor) -> list[Tensor]:
    return [new if t["name"] == name else (t, b) for t, b in ts]


def _header(value: Callable[[int, int], str]) -> Callable[[list[Tensor]], Any]:
    """A request whose header says ``value(JSON part's length, body's length)``."""

    def make(ts: list[Tensor]) -> Any:
        content, headers = body(ts)
        given = value(int(headers[HEADER]), len(content)).encode("latin-1")  # a header's bytes
        return content, headers | {HEADER: given}

    return make


def _raw(ts: list[Tensor], name: str, change: Callable[[dict[str, Any], bytes], bytes]) -> Any:
    """The request with one input's description and bytes changed in place."""
    out = []
    for t, b in ts:
        if t["name"] == name:
            t = {**t, "parameters": dict(t["parameters"])}
            b = change(t, b)
        out.append((t, b))
    return body(out)


def _with_size(t: dict[str, Any], b: bytes, size: Any) -> bytes:
    t["parameters"]["binary_data_size"] = size
    return b


HOSTILE: dict[str, tuple[Callable[[list[Tensor]], Any], list[str]]] = {
    "NaN in FP64": (
        lambda ts: body(_set(ts, "amount", tensor("amount", "FP64", [1.0, np.nan, 2.0]))),
        ["'amount'[1]", "finite"],
    ),
    "infinity in FP32": (
        lambda ts: body(_set(ts, "hour", tensor("hour", "FP32", [np.inf, 1, 2]))),
        ["'hour'[0]", "inf is not a FP32 value"],
    ),
    "infinity in FP16": (
        lambda ts: body(_set(ts, "customer_age", tensor("customer_age", "FP16", [1, 2, -np.inf]))),
        ["'customer_age'[2]", "-inf is not a FP16 value"],
    ),
    "a BOOL byte that is not 0 or 1": (
        lambda ts: _raw(ts, "card_present", lambda t, b: b"\x00\x02\x01"),
        ["'card_present'", "0 or 1"],
    ),
    "BOOL for a number": (
        lambda ts: body(_set(ts, "amount", tensor("amount", "BOOL", [True, False, True]))),
        ["'amount'[0]", "expected a number, got bool"],
    ),
    "BYTES for a number": (
        lambda ts: body(_set(ts, "amount", tensor("amount", "BYTES", ["1", "2", "3 EUR"]))),
        ["'amount'[2]", "expected a number, got the text"],
    ),
    "a wide shape": (
        lambda ts: body(_set(ts, "amount", tensor("amount", "FP64", [1.0] * 6, shape=[3, 2]))),
        ["'amount'", "shape must be [N] or [N, 1]"],
    ),
    "a shape larger than the bytes": (
        lambda ts: _raw(ts, "amount", lambda t, b: _with_size(t, b[:8], 8)),
        ["'amount'", "3 FP32 elements take 12 bytes, got 8"],
    ),
    "a negative shape": (
        lambda ts: _raw(ts, "amount", lambda t, b: t.update(shape=[-3]) or b),
        ["'amount'", "non-negative integers"],
    ),
    "a size past the body": (
        lambda ts: _raw(ts, "amount", lambda t, b: _with_size(t, b, 10**6)),
        ["'amount'", "binary_data_size must be a byte count"],
    ),
    "a size that is true": (
        lambda ts: _raw(ts, "amount", lambda t, b: _with_size(t, b, True)),
        ["'amount'", "binary_data_size must be a byte count"],
    ),
    "a header past the body": (
        _header(lambda head, total: str(total + 5)),
        ["Inference-Header-Content-Length", "within the body"],
    ),
    "a header with a sign": (_header(lambda head, total: f"+{head}"), ["byte count"]),
    "a header with a superscript digit": (  # "²" is a digit to str.isdigit, not to int()
        _header(lambda head, total: f"{head}\xb2"),
        ["byte count"],
    ),
    "a header that cuts the JSON": (
        _header(lambda head, total: str(head - 3)),
        ["not valid JSON"],
    ),
    "a header that takes tensor bytes": (
        _header(lambda head, total: str(head + 4)),
        ["not valid JSON"],
    ),
    "bytes after the last input": (
        lambda ts: (lambda c, h: (c + b"\0\0", h))(*body(ts)),
        ["2 bytes after the last binary input"],
    ),
    "a BYTES element past the data": (
        lambda ts: _raw(ts, "country", lambda t, b: struct.pack("<I", 50) + b[4:]),
        ["'country'", "runs past the data"],
    ),
    "fewer BYTES elements than the shape": (
        lambda ts: _raw(ts, "country", lambda t, b: t.update(shape=[4]) or b),
        ["'country'", "ends inside element 3"],
    ),
    "BYTES that are not UTF-8": (
        lambda ts: body(
            _set(ts, "country", tensor("country", "BYTES", [b"\xff\xfe", b"US", b"FR"]))
        ),
        ["'country'[0]", "UTF-8"],
    ),
    "a category over the length limit": (
        lambda ts: body(_set(ts, "country", tensor("country", "BYTES", ["US", "x" * 300, "FR"]))),
        ["'country'[1]", "longer than 256 characters"],
    ),
    "a huge BYTES shape": (
        lambda ts: _raw(ts, "country", lambda t, b: t.update(shape=[10**12]) or b),
        ["'country'", "1000000000000 elements; a request holds 1 to"],
    ),
    "an unknown datatype": (
        lambda ts: _raw(ts, "amount", lambda t, b: t.update(datatype="COMPLEX64") or b),
        ["'amount'", "unknown datatype"],
    ),
    "an unknown input": (
        lambda ts: body([*ts, tensor("colour", "BYTES", ["red", "red", "red"])]),
        ["unknown input", "colour"],
    ),
    "an input given twice": (
        lambda ts: body([*ts, tensor("amount", "FP64", [1.0, 2.0, 3.0])]),
        ["'amount'", "given twice"],
    ),
    "inputs of different lengths": (
        lambda ts: body(_set(ts, "amount", tensor("amount", "FP64", [1.0, 2.0]))),
        ["different lengths"],
    ),
    "a required input left out": (
        lambda ts: body([(t, b) for t, b in ts if t["name"] != "amount"]),
        ["'amount'", "required"],
    ),
    "data and bytes both": (
        lambda ts: _raw(ts, "amount", lambda t, b: t.update(data=[1, 2, 3]) or b),
        ["'amount'", "both 'data' and binary_data_size"],
    ),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_binary_requests_get_a_400_naming_the_input_and_the_reason(
    client: InProcess, manifest: Manifest, kind: str
) -> None:
    make, expected = HOSTILE[kind]
    content, headers = make(tensors(payments(3, seed=83), manifest))
    r = infer(client, manifest, content, headers)
    assert r.status_code == 400, (kind, r.text)
    message = r.json()["error"]
    assert set(r.json()) == {"error"}
    for part in expected:
        assert part in message, (kind, message)


def test_values_training_never_saw_are_scored_flagged_and_named(
    client: InProcess, manifest: Manifest
) -> None:
    df = generate_payments(3, seed=84).fillna({"device": "mobile", "distance_from_home_km": 0.0})
    df.loc[1, "amount"] = 5e9  # far beyond any amount seen in training
    df.loc[2, "merchant_category"] = "moon_base"
    ts = tensors(df, manifest)
    # a boolean sent as a number: 7 is no boolean, but a value (kept, found unusual)
    ts = _set(ts, "card_present", tensor("card_present", "UINT8", [1, 0, 7]))
    content, headers = body(ts, parameters={"binary_data_output": True})
    r = infer(client, manifest, content, headers)
    assert r.status_code == 200, r.text
    out = outputs(r)
    assert out["is_anomaly"][1:].all()  # an unusual value is never normal
    head = orjson.loads(r.content[: int(r.headers[HEADER])])
    unusual = {
        (u["index"], u["field"], u["kind"]): u["value"]
        for u in head["parameters"]["unusual_values"]
    }
    assert unusual[(1, "amount", "out_of_range")] == pytest.approx(5e9, rel=1e-6)  # FP32
    assert unusual[(2, "merchant_category", "unseen_category")] == "moon_base"
    assert unusual[(2, "card_present", "not_boolean")] == 7


@pytest.mark.parametrize(
    ("country", "expected"),
    [
        ([b"\xc3"], ["'country'[0]", "UTF-8"]),  # a character cut short
        (struct.pack("<I", 9) + b"US", ["'country'", "runs past the data"]),
        (struct.pack("<I", 1) + b"US", ["'country'", "1 bytes after the last BYTES element"]),
    ],
)
def test_one_record_with_broken_bytes_gets_a_400(
    client: InProcess, manifest: Manifest, country: Any, expected: list[str]
) -> None:
    """One record: its BYTES are read at once, and anything amiss gets the general decoder's
    message."""
    ts = tensors(payments(1, seed=85), manifest)
    if isinstance(country, list):
        content, headers = body(_set(ts, "country", tensor("country", "BYTES", country)))
    else:
        content, headers = _raw(ts, "country", lambda t, b: _with_size(t, country, len(country)))
    r = infer(client, manifest, content, headers)
    assert r.status_code == 400, r.text
    for part in expected:
        assert part in r.json()["error"], r.text
