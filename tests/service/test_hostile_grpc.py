"""gRPC ``ModelInfer`` messages built to be costly (fast tier, in process): raw contents of
millions of empty BYTES elements, with an input parameter, or with the fields in another order.
Both used to be decoded element by element when the message was read, on the event loop (4
million elements: seconds, every other call and HTTP request waiting); now they reach the V2
parser as binary tensors, in its time (off the loop when big), and are refused unread."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from service import grpc_wire, v2_request
from service.bundle import read_bundle
from service.errors import BadRequest
from service.proto import predict_v2_pb2 as pb
from service.settings import Settings

N = 4_000_000  # 16 MB of empty BYTES elements, the body limit


def costly(manifest: Any, *, parameter: bool) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=manifest.name)
    t = req.inputs.add(name="country", datatype="BYTES", shape=[N])
    if parameter:
        t.parameters["note"].string_param = "x"
    req.raw_input_contents.append(struct.pack("<I", 0) * N)
    return req


def reordered(req: pb.ModelInferRequest) -> bytes:
    """The message with its raw contents first (protobuf reads fields in any order)."""
    raw = b"".join(grpc_wire._field(0x3A, r) for r in req.raw_input_contents)
    del req.raw_input_contents[:]
    return raw + req.SerializeToString()


@pytest.mark.parametrize("layout", ["an input parameter", "fields out of order"])
def test_a_costly_message_reaches_the_parser_as_binary_tensors_and_is_refused_unread(
    bundle_dir: Path, layout: str
) -> None:
    manifest = read_bundle(bundle_dir).manifest
    req = costly(manifest, parameter=layout == "an input parameter")
    message = req.SerializeToString() if layout == "an input parameter" else reordered(req)
    body, size, tail = grpc_wire.read(message).parts(10_000)
    assert tail is not None, "decoded when read (on the event loop)"
    assert size == N  # what the service weighs to parse off the loop
    with pytest.raises(BadRequest, match=f"{N} elements; a request holds 1 to 10000 records"):
        v2_request.parse(body, manifest, Settings(bundle=bundle_dir), tail)


def test_an_input_parameter_is_kept_beside_the_binary_tensor(bundle_dir: Path) -> None:
    """The parser sees the input's own parameters as the JSON form carries them."""
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="country", datatype="BYTES", shape=[1])
    t.parameters["note"].string_param = "x"
    req.raw_input_contents.append(b"\x02\x00\x00\x00US")
    body, size, tail = grpc_wire.read(req.SerializeToString()).parts(10_000)
    assert body["inputs"][0]["parameters"] == {"note": "x", "binary_data_size": 6}
    assert (size, tail) == (1, (req.raw_input_contents[0], 0))
