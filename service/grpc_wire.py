"""The V2 gRPC ``ModelInfer`` messages as bytes: a request read into the JSON inference request
it stands for (validated by the REST path's parser, service/v2_request.py), a response written.

Every call is the hot path, and reading a request through protobuf message objects costs more
than validating it (each field access on a message is a call into the protobuf runtime). So a
request sent as serializers write it (fields in number order) with ``raw_input_contents`` (as
tritonclient sends it) is read straight from its bytes: the model name, version and id, then
the part describing the tensors (request parameters, inputs, requested outputs), worked out
once per distinct part and kept (a client sends the same part call after call; only parts of
up to 4 KiB, a few dozen of them), then each input's raw bytes. Anything else (typed
``contents``, another field order, a malformed message) is read through the protobuf message,
as before; both ways give the same request. A request with one raw contents per input (in
whatever field order) goes to the V2 parser as a REST request with binary tensors would
(``Request.binary``), so its tensors are read array-wide by the same code, at less cost than
as decoded arrays in a JSON request (``Request.json``), with the same values or errors, and
in the parser's time: off the event loop when big, a tensor of more elements than a request
may hold records refused unread (16 MB of empty BYTES elements took the loop for seconds).

A response is a message prefix kept per (model, score type, threshold, outputs, records),
then the parts that change per call appended as protobuf fields: the values the model never
saw (``parameters["unusual_values"]``, a JSON string, as REST names them), the id, and the
outputs' raw bytes (protobuf readers accept fields in any order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf.message import DecodeError

from service import v2_binary
from service.errors import BadRequest
from service.proto import predict_v2_pb2 as pb

CONTENTS = {  # datatype -> the InferTensorContents field holding it
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# ModelInferRequest's fields (all length-delimited), by their one-byte tags
NAME, VERSION, ID, PARAMETERS, INPUTS, OUTPUTS, RAW = 0x0A, 0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A
LAYOUT = (PARAMETERS, INPUTS, OUTPUTS)
# ModelInferResponse's fields written per call: its id and its outputs' raw contents
RESPONSE_ID, RESPONSE_RAW = 0x1A, 0x32
CACHED = 64  # distinct request layouts / response prefixes kept (a few clients send a few each)
KEPT_LAYOUT_BYTES = 4096  # a bigger tensors' part is read every time: the cache stays small


def decode(message: bytes) -> pb.ModelInferRequest:
    try:
        return pb.ModelInferRequest.FromString(message)
    except DecodeError as e:
        raise BadRequest(f"the request is not a valid ModelInferRequest message: {e}") from None


def _param(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _typed(t: Any, most: int) -> list[Any]:
    """An input tensor's elements from its typed ``contents`` (at most ``most`` of them)."""
    field = CONTENTS.get(t.datatype)
    if field is None:  # FP16 has no typed field: raw contents only
        raise BadRequest(f"input {t.name!r}: datatype {t.datatype!r} needs raw_input_contents")
    values = getattr(t.contents, field)
    v2_binary.at_most(t.name, len(values), most)
    if field != "bytes_contents":
        return list(values)
    try:
        return [v.decode("utf-8") for v in values]
    except UnicodeDecodeError:
        raise BadRequest(f"input {t.name!r}: a BYTES element is not UTF-8 text") from None


def _tensor(t: Any, data: Any) -> dict[str, Any]:
    """An input tensor as JSON (``data``: its elements, a list or an array)."""
    tensor = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "data": data}
    if t.parameters:
        tensor["parameters"] = {k: _param(v) for k, v in t.parameters.items()}
    return tensor


def _extras(req: pb.ModelInferRequest, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with the request's parameters and requested outputs, when it has them."""
    if req.parameters:
        body["parameters"] = {k: _param(v) for k, v in req.parameters.items()}
    if req.outputs:
        body["outputs"] = [{"name": o.name} for o in req.outputs]
    return body


def request_json(req: pb.ModelInferRequest, most: int) -> tuple[dict[str, Any], int]:
    """The JSON inference request a gRPC one stands for, read through its message, and the
    number of values in it (an input of more than ``most`` elements is refused unread)."""
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs")
    inputs = []
    for i, t in enumerate(req.inputs):
        if not raw:
            inputs.append(_tensor(t, _typed(t, most)))
            continue
        if t.HasField("contents"):
            raise BadRequest(f"input {t.name!r}: both contents and raw_input_contents")
        count = v2_binary.at_most(t.name, v2_binary.element_count(t.name, list(t.shape)), most)
        inputs.append(_tensor(t, v2_binary.decode_tensor(t.name, t.datatype, raw[i], count)))
    body: dict[str, Any] = {"inputs": inputs}
    if req.id:
        body["id"] = req.id
    return _extras(req, body), sum(len(t["data"]) for t in inputs)


@dataclass(frozen=True)
class Layout:
    """The tensors' part of a request (its parameters, inputs and outputs) as JSON, each
    input's data left out; read once per distinct part."""

    inputs: list[tuple[dict[str, Any], int]]  # (the input without data, its element count)
    extras: dict[str, Any]  # parameters and outputs, when given
    # the inputs as binary tensors' headers: no data, their own parameters kept (see
    # Request.binary)
    binary: list[dict[str, Any]]

    @classmethod
    def read(cls, part: bytes) -> Layout:
        req = decode(part)
        inputs = []
        for t in req.inputs:
            if t.HasField("contents"):
                raise BadRequest(f"input {t.name!r}: both contents and raw_input_contents")
            inputs.append((_tensor(t, []), v2_binary.element_count(t.name, list(t.shape))))
        heads = [{k: v for k, v in t.items() if k != "data"} for t, _ in inputs]
        return cls(inputs, _extras(req, {}), heads)

    @staticmethod
    def of(part: bytes) -> Layout:
        """The layout of ``part``, read once and kept (unless it is big)."""
        layout = _layouts.get(part)
        if layout is None:
            layout = Layout.read(part)  # a bad part raises: it is never kept
            if len(part) <= KEPT_LAYOUT_BYTES:
                if len(_layouts) >= CACHED:
                    _layouts.clear()
                _layouts[part] = layout
        return layout


_layouts: dict[bytes, Layout] = {}


# what the V2 parser takes: (the JSON request, the number of values, its binary tensors' bytes
# from an offset, or None)
Parts = tuple[dict[str, Any], int, tuple[bytes, int] | None]


@dataclass
class Request:
    """A ModelInferRequest as read from its bytes: who it is for, then (:meth:`json`) what
    it asks."""

    model_name: str
    model_version: str
    id: str
    layout: bytes  # the bytes of its parameters, inputs and outputs
    raw: list[memoryview]
    message: pb.ModelInferRequest | None  # when read through protobuf instead

    def json(self, most: int) -> tuple[dict[str, Any], int]:
        """The JSON inference request it stands for, and the number of values in it (an
        input of more than ``most`` elements is refused unread)."""
        if self.message is not None:
            return request_json(self.message, most)
        layout = Layout.of(self.layout)
        if len(self.raw) != len(layout.inputs):
            raise BadRequest(f"{len(self.raw)} raw_input_contents for {len(layout.inputs)} inputs")
        inputs, size = [], 0
        for (t, count), raw in zip(layout.inputs, self.raw, strict=True):
            v2_binary.at_most(t["name"], count, most)
            data = v2_binary.decode_tensor(t["name"], t["datatype"], raw, count)
            size += len(data)
            inputs.append(t | {"shape": list(t["shape"]), "data": data})
        return self._body(inputs, layout), size

    def binary(self) -> tuple[dict[str, Any], int, tuple[bytes, int]] | None:
        """The request as a REST one with binary tensors: (its JSON part, the number of values,
        (its tensors' bytes, 0)), for the V2 parser's array-wide reading of binary tensors
        (``v2_request.parse``'s ``tail``: cheaper than :meth:`json`'s arrays, and the same
        values or errors; and its tensors are decoded off the event loop, each refused unread
        when it holds more elements than a request may hold records); None unless read from
        its bytes with one raw contents per input (then :meth:`json`)."""
        if self.message is not None:
            return None
        layout = Layout.of(self.layout)
        if len(self.raw) != len(layout.binary):
            return None
        inputs = [
            t | {"parameters": {**t.get("parameters", {}), "binary_data_size": len(raw)}}
            for t, raw in zip(layout.binary, self.raw, strict=True)
        ]
        size = sum(count for _, count in layout.inputs)
        return self._body(inputs, layout), size, (b"".join(self.raw), 0)

    def parts(self, most: int) -> Parts:
        """What the V2 parser takes: (the JSON request, the number of values, its binary
        tensors' bytes or None), as binary tensors where :meth:`binary` can, else as JSON
        (inputs of at most ``most`` elements)."""
        fast = self.binary()
        return fast if fast is not None else (*self.json(most), None)

    def _body(self, inputs: list[dict[str, Any]], layout: Layout) -> dict[str, Any]:
        body = {"inputs": inputs, **layout.extras}
        if self.id:
            body["id"] = self.id
        return body


def _varint(msg: bytes, pos: int) -> tuple[int, int]:
    """(the varint at ``pos``, the position after it); IndexError past the end."""
    value, shift = 0, 0
    while True:
        b = msg[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def scan(message: bytes) -> Request | None:
    """A serialized ModelInferRequest read from its bytes (tags and lengths only) when laid out
    as serializers write it with raw contents, else None."""
    try:
        return _scan(message)
    except (IndexError, UnicodeDecodeError):
        return None  # malformed: protobuf says how


def read_parts(message: bytes, most: int) -> tuple[str, str, Parts]:
    """(model name, model version, :meth:`Request.parts`) of a serialized ModelInferRequest."""
    req = read(message)
    return req.model_name, req.model_version, req.parts(most)


def read(message: bytes) -> Request:
    """A serialized ModelInferRequest (:func:`scan`, else :func:`decoded`)."""
    return scan(message) or decoded(message)


def decoded(message: bytes) -> Request:
    """A serialized ModelInferRequest read through protobuf (one :func:`scan` cannot read); a
    malformed one raises BadRequest."""
    req = decode(message)
    raw, inputs = req.raw_input_contents, req.inputs
    if raw and len(raw) == len(inputs) and not any(t.HasField("contents") for t in inputs):
        # raw contents with the fields in another order: read as if in order (so decoded
        # off the event loop, bounded: see Request.binary)
        part = pb.ModelInferRequest()
        part.CopyFrom(req)
        for name in ("model_name", "model_version", "id", "raw_input_contents"):
            part.ClearField(name)
        views = [memoryview(r) for r in raw]
        return Request(req.model_name, req.model_version, req.id, part.SerializeToString(),
                       views, None)  # fmt: skip
    return Request(req.model_name, req.model_version, req.id, b"", [], req)


def _scan(msg: bytes) -> Request | None:
    """The request from its top-level fields (tags and lengths only: the tensors' part is
    one slice); None unless its fields come in number order and it has raw contents."""
    view = memoryview(msg)
    strings = {NAME: "", VERSION: "", ID: ""}
    raw: list[memoryview] = []
    pos, end, last, start, stop = 0, len(msg), 0, -1, -1
    while pos < end:
        tag = msg[pos]
        if tag < last or tag not in (NAME, VERSION, ID, PARAMETERS, INPUTS, OUTPUTS, RAW):
            return None
        size, at = _varint(msg, pos + 1)
        after = at + size
        if after > end:
            return None
        if tag == RAW:
            raw.append(view[at:after])
        elif tag in LAYOUT:
            start = pos if start < 0 else start
            stop = after
        else:
            strings[tag] = str(view[at:after], "utf-8")
        last, pos = tag, after
    if not raw:
        return None
    layout = msg[start:stop] if start >= 0 else b""
    return Request(strings[NAME], strings[VERSION], strings[ID], layout, raw, None)


# ---------------------------------------------------------------- responses


def _field(tag: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    size, head = len(data), bytearray([tag])
    while size >= 0x80:
        head.append(size & 0x7F | 0x80)
        size >>= 7
    head.append(size)
    return bytes(head) + data


_prefixes: dict[tuple[Any, ...], bytes] = {}


def _prefix(out: dict[str, Any]) -> bytes:
    """The response's fields that stay the same call after call (all but id, unusual values
    and the outputs' bytes), serialized."""
    params = out["parameters"]
    outputs = tuple((o["name"], o["datatype"], *o["shape"]) for o in out["outputs"])
    key = (out["model_name"], out["model_version"], params["score_type"], params["threshold"],
           outputs)  # fmt: skip
    prefix = _prefixes.get(key)
    if prefix is None:
        resp = pb.ModelInferResponse(
            model_name=out["model_name"], model_version=out["model_version"]
        )
        resp.parameters["score_type"].string_param = params["score_type"]
        resp.parameters["threshold"].double_param = params["threshold"]
        for name, datatype, *shape in outputs:
            resp.outputs.add(name=name, datatype=datatype, shape=shape)
        if len(_prefixes) >= CACHED:
            _prefixes.clear()
        prefix = _prefixes[key] = resp.SerializeToString()
    return prefix


def response(out: dict[str, Any], arrays: dict[str, Any]) -> bytes:
    """A serialized ModelInferResponse of a scored request (``out``: the REST response's JSON,
    ``arrays``: the outputs by name); outputs as ``raw_output_contents``, as Triton sends them."""
    parts = [_prefix(out)]
    unusual = out["parameters"].get("unusual_values")
    if unusual:
        resp = pb.ModelInferResponse()
        resp.parameters["unusual_values"].string_param = orjson.dumps(
            unusual, option=orjson.OPT_SERIALIZE_NUMPY
        ).decode()
        parts.append(resp.SerializeToString())
    rid = out.get("id")
    if rid:
        parts.append(_field(RESPONSE_ID, rid.encode()))
    for o in out["outputs"]:
        parts.append(_field(RESPONSE_RAW, v2_binary.encode(o["datatype"], arrays[o["name"]])))
    return b"".join(parts)
