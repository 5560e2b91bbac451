"""The Open Inference Protocol in full, spoken to by the clients V2 users use: binary tensors
over REST (``tritonclient.http`` at its defaults), the model repository index, and the gRPC
API (``tritonclient.grpc``, and hand-made messages for the typed contents, built with Triton's
own message classes: the server's are never imported here, so the two sides share no code). A
real server, one process, API keys on, gRPC on its own port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pandas as pd
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2 as pb  # Triton's messages: a superset of V2's
from tritonclient.utils import InferenceServerException

from service.bundle import Manifest, read_bundle
from tests.conftest import Server, free_port, metric_samples, records, run_server, value
from training.demo_data import generate_payments, make_anomalies

KEY = "protocol-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_RECORDS = 100
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def manifest(bundle_dir: Path) -> Manifest:
    return read_bundle(bundle_dir).manifest


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    grpc_port = free_port()
    env = {
        "VAE_ANOMALY_API_KEYS": KEY,
        "VAE_ANOMALY_MAX_RECORDS": str(MAX_RECORDS),
        "VAE_ANOMALY_MAX_BODY_BYTES": str(MAX_BODY),
    }
    args = ["serve", "--bundle", str(bundle_dir), "--grpc-port", str(grpc_port)]
    with run_server(args, tmp_path_factory.mktemp("protocol"), env=env) as s:
        s.grpc = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30, headers=dict(AUTH)) as c:
        yield c


def payments(n: int, seed: int) -> pd.DataFrame:
    """Normal and anomalous card-present payments with no missing value but ``device`` (never
    set when the card is present): a binary tensor has no null, so that input is left out."""
    parts = []
    for df in (generate_payments(4 * n, seed), make_anomalies(4 * n, seed)):
        df = df[df.card_present & df.customer_age.notna() & df.distance_from_home_km.notna()]
        parts.append(df.head(n - n // 2 if not parts else n // 2))
    return pd.concat(parts, ignore_index=True)


def triton_inputs(mod: Any, df: pd.DataFrame, m: Manifest, binary: Any = True) -> list[Any]:
    """One tensor per feature (``device`` left out): numbers as FP32 or INT64, as a Triton user
    would send them from a data frame; ``binary`` may be a set of the inputs to send binary."""
    out = []
    for f in m.features:
        if f.name == "device":
            continue
        col = df[f.name]
        if f.kind == "numeric":
            is_int = (col == col.round()).all()
            arr = col.to_numpy(np.int64 if is_int else np.float32)
        elif f.kind == "boolean":
            arr = col.to_numpy(bool)
        else:
            arr = col.astype(str).to_numpy(object)
        dt = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(bool): "BOOL"}
        t = mod.InferInput(f.name, [len(df)], dt.get(arr.dtype, "BYTES"))
        if mod is thttp:
            t.set_data_from_numpy(arr, binary_data=binary is True or f.name in binary)
        else:
            t.set_data_from_numpy(arr)
        out.append(t)
    return out


def native(client: httpx.Client, df: pd.DataFrame, score: str | None = None) -> list[Any]:
    params = {"score": score} if score else {}
    r = client.post("/v1/score", params=params, json={"records": records(df)})
    assert r.status_code == 200, r.text
    return list(r.json()["results"])


def assert_same(result: Any, expected: list[Any]) -> None:
    np.testing.assert_allclose(result.as_numpy("score"), [x["score"] for x in expected], rtol=1e-6)
    assert result.as_numpy("is_anomaly").tolist() == [x["is_anomaly"] for x in expected]
    np.testing.assert_allclose(
        result.as_numpy("percentile"), [x["percentile"] for x in expected], atol=1e-3
    )


# ---------------------------------------------------------------- the binary format, in process


# ---------------------------------------------------------------- REST: binary tensors


def test_tritonclient_http_at_its_defaults(
    server: Server, client: httpx.Client, manifest: Manifest
) -> None:
    """Binary inputs and binary outputs (tritonclient's defaults), same answers as /v1/score."""
    df = payments(12, seed=71)
    c = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    result = c.infer(manifest.name, triton_inputs(thttp, df, manifest), headers=dict(AUTH))
    expected = native(client, df)
    assert_same(result, expected)
    assert any(x["is_anomaly"] for x in expected) and not all(x["is_anomaly"] for x in expected)
    outputs = result.get_response()["outputs"]
    assert [o["parameters"]["binary_data_size"] for o in outputs] == [12 * 8, 12, 12 * 8]
    assert all("data" not in o for o in outputs)


def test_tritonclient_http_mixed_json_and_binary(
    server: Server, client: httpx.Client, manifest: Manifest
) -> None:
    """Some inputs binary, some JSON; one output binary, one JSON; score type and id."""
    df = payments(7, seed=72)
    c = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    inputs = triton_inputs(thttp, df, manifest, binary={"amount", "country", "card_present"})
    outputs = [
        thttp.InferRequestedOutput("score", binary_data=True),
        thttp.InferRequestedOutput("is_anomaly", binary_data=False),
    ]
    result = c.infer(
        manifest.name,
        inputs,
        outputs=outputs,
        request_id="mixed-1",
        parameters={"score_type": "iwae"},
        headers=dict(AUTH),
    )
    expected = native(client, df, "iwae")
    np.testing.assert_allclose(result.as_numpy("score"), [x["score"] for x in expected], rtol=1e-6)
    body = result.get_response()
    assert body["id"] == "mixed-1" and body["parameters"]["score_type"] == "iwae"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["is_anomaly"]["data"] == [x["is_anomaly"] for x in expected]
    assert "data" not in out["score"] and result.as_numpy("percentile") is None


def test_repository_index_and_server_metadata(server: Server, manifest: Manifest) -> None:
    c = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    index = c.get_model_repository_index(headers=dict(AUTH))
    assert index == [
        {"name": manifest.name, "version": manifest.version, "state": "READY", "reason": ""}
    ]
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    assert c.is_model_ready(manifest.name, headers=dict(AUTH))
    with pytest.raises(InferenceServerException, match="API key"):
        c.get_model_repository_index()  # the index names the model: it needs a key too
    r = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}, headers=dict(AUTH))
    assert r.status_code == 200 and [m["name"] for m in r.json()] == [manifest.name]
    r = httpx.post(f"{server.url}/v2/repository/index", json={"ready": "yes"}, headers=dict(AUTH))
    assert r.status_code == 400 and "ready" in r.json()["error"]


def binary_body(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + b"".join(blobs), {
        **AUTH,
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(head)),
    }


def fp64(name: str, *values: float) -> tuple[dict[str, Any], bytes]:
    blob = np.array(values, "<f8").tobytes()
    tensor = {
        "name": name,
        "datatype": "FP64",
        "shape": [len(values)],
        "parameters": {"binary_data_size": len(blob)},
    }
    return tensor, blob


def hostile(kind: str, m: Manifest) -> tuple[bytes, dict[str, str]]:
    """A request the binary decoder must refuse with a 400 (and the server survive)."""
    df = payments(2, seed=73)
    tensor, blob = fp64("amount", *df.amount)
    header = {"inputs": [tensor]}
    body, headers = binary_body(header, blob)
    if kind == "header_not_a_number":
        headers["inference-header-content-length"] = "-5"
    elif kind == "header_past_the_body":
        headers["inference-header-content-length"] = str(len(body) + 1)
    elif kind == "header_cuts_the_json":
        headers["inference-header-content-length"] = "7"
    elif kind == "size_past_the_body":
        tensor["parameters"]["binary_data_size"] = 10**9
        body, headers = binary_body(header, blob)
    elif kind == "size_not_an_integer":
        tensor["parameters"]["binary_data_size"] = "16"
        body, headers = binary_body(header, blob)
    elif kind == "bytes_left_over":
        body, headers = binary_body(header, blob, b"\0\0\0")
    elif kind == "data_and_binary":
        tensor["data"] = [1.0, 2.0]
        body, headers = binary_body(header, blob)
    elif kind == "shape_disagrees":
        tensor["shape"] = [3]
        body, headers = binary_body(header, blob)
    elif kind == "shape_negative":
        tensor["shape"] = [-2]
        body, headers = binary_body(header, blob)
    elif kind == "json_part_not_an_object":
        body, headers = binary_body([1, 2])  # type: ignore[arg-type]
    elif kind == "binary_output_flag_not_bool":
        full = triton_request(df, m)
        full["parameters"] = {"binary_data_output": "yes"}
        body, headers = binary_body(full)
    return body, headers


def triton_request(df: pd.DataFrame, m: Manifest) -> dict[str, Any]:
    inputs = []
    for f in m.features:
        if f.name == "device":
            continue
        col = df[f.name]
        dt = {"numeric": "FP64", "boolean": "BOOL", "categorical": "BYTES"}[f.kind]
        data = [str(v) for v in col] if dt == "BYTES" else col.tolist()
        inputs.append({"name": f.name, "datatype": dt, "shape": [len(df)], "data": data})
    return {"inputs": inputs}


@pytest.mark.parametrize(
    "kind",
    [
        "header_not_a_number",
        "header_past_the_body",
        "header_cuts_the_json",
        "size_past_the_body",
        "size_not_an_integer",
        "bytes_left_over",
        "data_and_binary",
        "shape_disagrees",
        "shape_negative",
        "json_part_not_an_object",
        "binary_output_flag_not_bool",
    ],
)
def test_malformed_binary_requests_get_a_400(
    client: httpx.Client, manifest: Manifest, kind: str
) -> None:
    body, headers = hostile(kind, manifest)
    r = client.post(f"/v2/models/{manifest.name}/infer", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and r.json()["error"]


def test_a_binary_request_with_a_json_content_type(
    client: httpx.Client, manifest: Manifest
) -> None:
    """The header, not the content type, marks a binary body (clients send either)."""
    df = payments(3, seed=74)
    req = triton_request(df, manifest)
    tensor, blob = fp64("amount", *df.amount)
    req["inputs"][0] = tensor
    body, headers = binary_body(req, blob)
    headers["content-type"] = "application/json"
    r = client.post(f"/v2/models/{manifest.name}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    expected = native(client, df)
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], [x["score"] for x in expected])


# ---------------------------------------------------------------- gRPC


def test_tritonclient_grpc_matches_native(
    server: Server, client: httpx.Client, manifest: Manifest
) -> None:
    c = tgrpc.InferenceServerClient(server.grpc)  # type: ignore[attr-defined]
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready(manifest.name, headers=dict(AUTH))
    assert not c.is_model_ready("nope", headers=dict(AUTH))
    meta = c.get_model_metadata(manifest.name, headers=dict(AUTH), as_json=True)
    assert meta["name"] == manifest.name and meta["versions"] == [manifest.version]
    assert [o["name"] for o in meta["outputs"]] == ["score", "is_anomaly", "percentile"]
    assert "binary_tensor_data" in c.get_server_metadata(as_json=True)["extensions"]
    df = payments(9, seed=75)
    result = c.infer(
        manifest.name,
        triton_inputs(tgrpc, df, manifest),
        model_version=manifest.version,
        request_id="g-1",
        headers=dict(AUTH),
    )
    assert_same(result, native(client, df))
    assert result.get_response().id == "g-1"
    assert result.get_response().model_version == manifest.version


def typed_request(df: pd.DataFrame, m: Manifest) -> pb.ModelInferRequest:
    """A request with typed ``contents`` (no raw bytes), as KServe's own clients send it."""
    req = pb.ModelInferRequest(model_name=m.name, id="typed")
    for f in m.features:
        if f.name == "device":
            continue
        col = df[f.name]
        t = req.inputs.add(name=f.name, shape=[len(df)])
        if f.kind == "numeric":
            t.datatype = "FP64"
            t.contents.fp64_contents.extend(col.astype(float))
        elif f.kind == "boolean":
            t.datatype = "BOOL"
            t.contents.bool_contents.extend(col.astype(bool))
        else:
            t.datatype = "BYTES"
            t.contents.bytes_contents.extend(str(v).encode() for v in col)
    req.parameters["score_type"].string_param = "recon"
    return req


KEY_METADATA = tuple(AUTH.items())


def grpc_call(server: Server, req: Any, metadata: Any = KEY_METADATA) -> Any:
    with grpc.insecure_channel(server.grpc) as ch:  # type: ignore[attr-defined]
        infer = ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        return infer(req, metadata=metadata, timeout=30)


def test_grpc_typed_contents(server: Server, client: httpx.Client, manifest: Manifest) -> None:
    df = payments(5, seed=76)
    resp = grpc_call(server, typed_request(df, manifest))
    assert resp.id == "typed" and resp.parameters["score_type"].string_param == "recon"
    assert [o.name for o in resp.outputs] == ["score", "is_anomaly", "percentile"]
    scores = np.frombuffer(resp.raw_output_contents[0], "<f8")
    expected = native(client, df, "recon")
    np.testing.assert_allclose(scores, [x["score"] for x in expected], rtol=1e-6)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("no_key", grpc.StatusCode.UNAUTHENTICATED),
        ("wrong_key", grpc.StatusCode.PERMISSION_DENIED),
        ("unknown_model", grpc.StatusCode.NOT_FOUND),
        ("wrong_version", grpc.StatusCode.NOT_FOUND),
        ("wrong_datatype", grpc.StatusCode.INVALID_ARGUMENT),
        ("too_many_records", grpc.StatusCode.INVALID_ARGUMENT),
        ("raw_and_contents", grpc.StatusCode.INVALID_ARGUMENT),
        ("raw_count", grpc.StatusCode.INVALID_ARGUMENT),
        ("bad_utf8", grpc.StatusCode.INVALID_ARGUMENT),
        ("over_the_body_limit", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_grpc_errors(server: Server, manifest: Manifest, change: str, code: Any) -> None:
    df = payments(3, seed=77)
    req = typed_request(df, manifest)
    metadata: Any = tuple(AUTH.items())
    if change == "no_key":
        metadata = ()
    elif change == "wrong_key":
        metadata = (("x-api-key", "nope"),)
    elif change == "unknown_model":
        req.model_name = "nope"
    elif change == "wrong_version":
        req.model_version = "v0"
    elif change == "wrong_datatype":
        req.inputs[0].datatype = "BYTES"
    elif change == "too_many_records":
        big = pd.concat([df] * 40, ignore_index=True)  # 120 > MAX_RECORDS
        req = typed_request(big, manifest)
    elif change == "raw_and_contents":
        req.raw_input_contents.extend([b""] * len(req.inputs))
    elif change == "raw_count":
        del req.inputs[0].contents.fp64_contents[:]
        req.raw_input_contents.append(b"\0" * 8)
    elif change == "bad_utf8":
        cat = next(t for t in req.inputs if t.datatype == "BYTES")
        cat.contents.bytes_contents[0] = b"\xff"
    elif change == "over_the_body_limit":
        req.inputs[0].parameters["padding"].string_param = "x" * MAX_BODY
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(server, req, metadata)
    assert e.value.code() == code, e.value.details()
    assert e.value.details()


def raw_request(df: pd.DataFrame, m: Manifest) -> pb.ModelInferRequest:
    """A request with ``raw_input_contents``, as tritonclient.grpc sends it."""
    req = pb.ModelInferRequest(model_name=m.name, id="raw")
    for f in m.features:
        if f.name == "device":
            continue
        col, t = df[f.name], req.inputs.add(name=f.name, shape=[len(df)])
        if f.kind == "numeric":
            t.datatype, blob = "FP64", col.to_numpy("<f8").tobytes()
        elif f.kind == "boolean":
            t.datatype, blob = "BOOL", col.to_numpy(bool).astype("u1").tobytes()
        else:
            t.datatype = "BYTES"
            blob = b"".join(
                len(v).to_bytes(4, "little") + v for v in (str(x).encode() for x in col)
            )
        req.raw_input_contents.append(blob)
    return req


def grpc_bytes(server: Server, message: bytes) -> Any:
    """A ModelInfer call with these bytes as the request message."""
    with grpc.insecure_channel(server.grpc) as ch:  # type: ignore[attr-defined]
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        return infer(message, metadata=KEY_METADATA, timeout=30)


def test_grpc_raw_contents_name_what_the_model_never_saw(
    server: Server, client: httpx.Client, manifest: Manifest
) -> None:
    df = payments(4, seed=79)
    df.loc[2, "merchant_category"] = "time_travel_agency"
    resp = pb.ModelInferResponse.FromString(
        grpc_bytes(server, raw_request(df, manifest).SerializeToString())
    )
    assert resp.id == "raw"
    scores = np.frombuffer(resp.raw_output_contents[0], "<f8")
    np.testing.assert_allclose(scores, [x["score"] for x in native(client, df)], rtol=1e-6)
    unusual = orjson.loads(resp.parameters["unusual_values"].string_param)
    assert (2, "merchant_category", "time_travel_agency") in [
        (u["index"], u["field"], u["value"]) for u in unusual
    ]
    r = client.post(f"/v2/models/{manifest.name}/infer", json=triton_request(df, manifest))
    assert unusual == r.json()["parameters"]["unusual_values"]  # as REST names them


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ("not_a_message", "ModelInferRequest"),
        ("raw_one_byte_short", "amount"),
        ("shape_says_more", "amount"),
        ("bool_not_0_or_1", "card_present"),
        ("bytes_element_runs_past", "merchant_category"),
        ("missing_input", "hour"),
        ("raw_for_no_input", "raw_input_contents"),
    ],
)
def test_grpc_hostile_raw_requests_are_invalid_arguments(
    server: Server, manifest: Manifest, change: str, names: str
) -> None:
    req = raw_request(payments(2, seed=80), manifest)
    at = {t.name: i for i, t in enumerate(req.inputs)}
    if change == "raw_one_byte_short":
        req.raw_input_contents[at["amount"]] = req.raw_input_contents[at["amount"]][:-1]
    elif change == "shape_says_more":
        req.inputs[at["amount"]].shape[0] = 3
    elif change == "bool_not_0_or_1":
        req.raw_input_contents[at["card_present"]] = b"\x01\x07"
    elif change == "bytes_element_runs_past":
        req.raw_input_contents[at["merchant_category"]] = b"\xff\x00\x00\x00abc"
    elif change == "missing_input":
        del req.inputs[at["hour"]]
        del req.raw_input_contents[at["hour"]]
    elif change == "raw_for_no_input":
        req.raw_input_contents.append(b"\0" * 8)
    message = b"\x0a\xff\x01oops" if change == "not_a_message" else req.SerializeToString()
    with pytest.raises(grpc.RpcError) as e:
        grpc_bytes(server, message)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert names in e.value.details()


def test_grpc_calls_are_counted_as_requests(
    server: Server, client: httpx.Client, manifest: Manifest
) -> None:
    before = metric_samples(client)
    df = payments(4, seed=78)
    grpc_call(server, typed_request(df, manifest))
    with pytest.raises(grpc.RpcError):
        grpc_call(server, typed_request(df, manifest), ())
    after = metric_samples(client)
    route = "/inference.GRPCInferenceService/ModelInfer"

    def delta(metric: str, /, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert delta("vae_anomaly_http_requests_total", method="POST", route=route, status="200") == 1
    assert delta("vae_anomaly_http_requests_total", method="POST", route=route, status="401") == 1
    assert delta("vae_anomaly_records_scored_total") == 4
    assert "grpc" in server.logs() and route in server.logs()
