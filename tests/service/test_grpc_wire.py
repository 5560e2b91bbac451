"""gRPC ``ModelInfer`` messages read and written as bytes (service/grpc_wire.py), in process:
a request read from its bytes is the request protobuf reads, whatever the bytes; a response
written by hand is the message protobuf reads back. The messages are built and read with
Triton's own classes (tritonclient), not the server's."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as tpb  # same message names as the server's

from service import grpc_wire, v2_request
from service.bundle import read_bundle
from service.errors import BadRequest
from service.proto import predict_v2_pb2
from service.settings import Settings
from tests.conftest import records
from training.demo_data import generate_payments

MOST = Settings.model_fields["max_records"].default  # records a request may hold


def request(rid: str = "", params: bool = False, outputs: bool = False) -> Any:
    """A request as tritonclient sends it: raw contents, one input of each kind."""
    req = tpb.ModelInferRequest(model_name="payments", model_version="3", id=rid)
    for name, dt, blob in (
        ("amount", "FP64", struct.pack("<2d", 12.5, -3.0)),
        ("count", "INT32", struct.pack("<2i", 7, -1)),
        ("present", "BOOL", b"\x01\x00"),
        ("city", "BYTES", b"\x04\x00\x00\x00Oslo\x00\x00\x00\x00"),
    ):
        req.inputs.add(name=name, datatype=dt, shape=[2])
        req.raw_input_contents.append(blob)
    if params:
        req.parameters["score_type"].string_param = "recon"
        req.inputs[0].parameters["unit"].string_param = "EUR"
    if outputs:
        req.outputs.add(name="score")
    return req


def plain(read: tuple[dict[str, Any], int]) -> tuple[dict[str, Any], int]:
    """A read request with its tensors' data as lists (numbers arrive as numpy arrays)."""
    body, size = read
    inputs = [t | {"data": list(np.asarray(t["data"]).tolist())} for t in body["inputs"]]
    return body | {"inputs": inputs}, size


def slow(message: bytes) -> Any:
    """What the protobuf message says the request is (or the BadRequest it raises)."""
    try:
        return plain(grpc_wire.request_json(grpc_wire.decode(message), MOST))
    except BadRequest as e:
        return ("BadRequest", e.message)


def fast(message: bytes) -> Any:
    try:
        return plain(grpc_wire.read(message).json(MOST))
    except BadRequest as e:
        return ("BadRequest", e.message)


@pytest.mark.parametrize("extras", [{}, {"rid": "r-1"}, {"params": True, "outputs": True}])
def test_a_request_read_from_its_bytes_is_what_protobuf_reads(extras: dict[str, Any]) -> None:
    message = request(**extras).SerializeToString()
    body, size = fast(message)
    assert (body, size) == slow(message)
    assert size == 8 and body["inputs"][3]["data"] == ["Oslo", ""]
    assert fast(message) == (body, size)  # the second time from the kept layout
    head = grpc_wire.read(message)
    assert (head.model_name, head.model_version, head.message) == ("payments", "3", None)


def test_only_small_layouts_are_kept() -> None:
    """A client sending ever new, big tensors' parts (parameters of up to the body limit)
    cannot grow the kept layouts: a part over 4 KiB is read each time, never kept."""
    grpc_wire._layouts.clear()
    for i in range(3):
        req = request()
        req.parameters["padding"].string_param = f"{i}" * 5000
        body, _ = fast(req.SerializeToString())
        assert body["parameters"]["padding"] == f"{i}" * 5000
    assert not grpc_wire._layouts
    fast(request().SerializeToString())
    assert len(grpc_wire._layouts) == 1


def test_fields_out_of_order_and_typed_contents_are_read_through_protobuf() -> None:
    req = request(rid="x")
    message = req.SerializeToString()
    raw = b"".join(grpc_wire._field(0x3A, r) for r in req.raw_input_contents)
    del req.raw_input_contents[:]
    reordered = raw + req.SerializeToString()  # raw contents first: protobuf accepts it
    # then as if in order: binary tensors for the parser (decoded off the loop, bounded)
    assert grpc_wire.read(reordered).binary() is not None
    assert fast(reordered) == slow(message)
    typed = tpb.ModelInferRequest(model_name="payments")
    typed.inputs.add(name="amount", datatype="FP64", shape=[1]).contents.fp64_contents.append(2.5)
    assert fast(typed.SerializeToString())[0]["inputs"][0]["data"] == [2.5]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("short_fp64", "'amount'"),  # 7 bytes for one FP64
        ("long_int32", "'count'"),
        ("bool_byte", "'present'"),
        ("bytes_cut", "'city'"),
        ("extra_raw", "5 raw_input_contents for 4 inputs"),
        ("raw_and_contents", "'amount': both contents and raw_input_contents"),
        ("negative_shape", "'count'"),
        ("unknown_datatype", "'count'"),
        ("garbage", "not a valid ModelInferRequest"),
        ("truncated", "not a valid ModelInferRequest"),
    ],
)
def test_hostile_requests_are_bad_requests_naming_the_input(change: str, says: str) -> None:
    req = request()
    if change == "short_fp64":
        req.raw_input_contents[0] = b"\0" * 7
    elif change == "long_int32":
        req.raw_input_contents[1] += b"\0"
    elif change == "bool_byte":
        req.raw_input_contents[2] = b"\x01\x02"
    elif change == "bytes_cut":
        req.raw_input_contents[3] = b"\x09\x00\x00\x00Oslo"
    elif change == "extra_raw":
        req.raw_input_contents.append(b"")
    elif change == "raw_and_contents":
        req.inputs[0].contents.fp64_contents.extend([1.0, 2.0])
    elif change == "negative_shape":
        req.inputs[1].shape[0] = -2
    elif change == "unknown_datatype":
        req.inputs[1].datatype = "INT128"
    message = req.SerializeToString()
    if change == "garbage":
        message = b"\xff\xff\xff\xff"
    elif change == "truncated":
        message = message[:-3]
    with pytest.raises(BadRequest) as e:
        grpc_wire.read(message).json(MOST)
    assert says in e.value.message
    assert slow(message)[0] == "BadRequest"  # protobuf's way refuses it too


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_bytes_read_as_protobuf_reads_them(data: st.DataObject) -> None:
    """Whatever the bytes (a request cut, spliced, bytes changed): the same request, or a
    BadRequest, both ways; never another exception."""
    message = bytearray(request(rid="r", params=data.draw(st.booleans())).SerializeToString())
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, len(message) - 1))
        message[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(message)))
    message = bytes(message[:cut] + data.draw(st.binary(max_size=8)))
    assert fast(message) == slow(message)


def test_a_response_written_by_hand_is_the_message_protobuf_writes() -> None:
    arrays = {"score": np.array([0.5, 7.25]), "is_anomaly": np.array([False, True])}
    unusual = [{"index": 1, "field": "city", "value": "Atlantis", "kind": "unknown_category"}]
    out: dict[str, Any] = {
        "model_name": "payments",
        "model_version": "3",
        "id": "r-9",
        "parameters": {"score_type": "elbo", "threshold": 1.5, "unusual_values": unusual},
        "outputs": [
            {"name": "score", "datatype": "FP64", "shape": [2]},
            {"name": "is_anomaly", "datatype": "BOOL", "shape": [2]},
        ],
    }
    for _ in range(2):  # the second time from the kept prefix
        resp = tpb.ModelInferResponse.FromString(grpc_wire.response(out, arrays))
        assert (resp.model_name, resp.model_version, resp.id) == ("payments", "3", "r-9")
        assert resp.parameters["score_type"].string_param == "elbo"
        assert resp.parameters["threshold"].double_param == 1.5
        assert orjson.loads(resp.parameters["unusual_values"].string_param) == unusual
        assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [
            ("score", "FP64", [2]),
            ("is_anomaly", "BOOL", [2]),
        ]
        assert np.frombuffer(resp.raw_output_contents[0], "<f8").tolist() == [0.5, 7.25]
        assert list(resp.raw_output_contents[1]) == [0, 1]
    big = {"score": np.arange(300.0)}  # a length over 127: a two-byte varint
    out = {**out, "id": "", "parameters": {"score_type": "elbo", "threshold": 1.5}}
    out["outputs"] = [{"name": "score", "datatype": "FP64", "shape": [300]}]
    resp = tpb.ModelInferResponse.FromString(grpc_wire.response(out, big))
    assert np.frombuffer(resp.raw_output_contents[0], "<f8").tolist() == list(range(300))
    assert resp.id == "" and "unusual_values" not in resp.parameters


def test_the_service_messages_load_beside_triton_s() -> None:
    """Both define ``inference.ModelInferRequest``: the service's live in a pool of their own,
    so a process may load both (it could not: duplicate symbol at import)."""
    req = request(rid="both")
    ours = predict_v2_pb2.ModelInferRequest.FromString(req.SerializeToString())
    assert ours.id == "both" and ours.SerializeToString() == req.SerializeToString()


def model_request(manifest: Any, rows: list[dict[str, Any]]) -> Any:
    """A request for the model's features, as tritonclient sends it (raw contents)."""
    req = tpb.ModelInferRequest(model_name=manifest.name)
    for f in manifest.features:
        values = [r.get(f.name) for r in rows]
        values = [v for v in values if v is not None] or [{"numeric": 1.0}.get(f.kind, "x")]
        values = (values * len(rows))[: len(rows)]  # binary tensors have no null
        if f.kind == "numeric":
            dt, blob = "FP64", struct.pack(f"<{len(values)}d", *[float(v) for v in values])
        elif f.kind == "boolean":
            dt, blob = "BOOL", bytes(bool(v) for v in values)
        else:
            words = [str(v).encode() for v in values]
            dt, blob = "BYTES", b"".join(struct.pack("<I", len(w)) + w for w in words)
        req.inputs.add(name=f.name, datatype=dt, shape=[len(values)])
        req.raw_input_contents.append(blob)
    return req


def parsed(manifest: Any, read: Any) -> Any:
    """What the V2 parser makes of a read request (columns as lists), or its BadRequest."""
    try:
        columns, n, *rest = v2_request.parse(*read[:1], manifest, Settings(), *read[2:])
    except BadRequest as e:
        return "BadRequest", e.message
    return {k: np.asarray(v).tolist() for k, v in columns.items()}, n, rest


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_binary_form_parses_as_the_json_form(bundle_dir: Path, data: st.DataObject) -> None:
    """ModelInfer hands the parser a request read from its bytes as binary tensors (cheaper);
    whatever the raw contents (a byte changed, cut or added: NaN, BOOL 2, broken UTF-8, a
    size that lies), the parser gives the same columns, or the same 400, as from the JSON
    form with decoded tensors."""
    manifest = read_bundle(bundle_dir).manifest
    n = data.draw(st.integers(1, 3))
    rows = records(generate_payments(n, seed=data.draw(st.integers(0, 99))))
    req = model_request(manifest, rows)
    for _ in range(data.draw(st.integers(0, 2))):
        i = data.draw(st.integers(0, len(req.raw_input_contents) - 1))
        blob = bytearray(req.raw_input_contents[i])
        at = data.draw(st.integers(0, len(blob)))
        change = data.draw(st.sampled_from(["flip", "cut", "add"]))
        if change == "flip" and at < len(blob):
            blob[at] = data.draw(st.integers(0, 255))
        elif change == "cut":
            del blob[at:]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        req.raw_input_contents[i] = bytes(blob)
    message = grpc_wire.read(req.SerializeToString())
    binary = message.binary()
    assert binary is not None  # the usual form
    try:
        json_form: Any = message.json(MOST)
    except BadRequest as e:  # a tensor that cannot be decoded at all
        json_form = None
        assert parsed(manifest, binary) == ("BadRequest", e.message)
    if json_form is not None:
        assert parsed(manifest, binary) == parsed(manifest, json_form)
