"""Binary tensors of the Open Inference Protocol: the REST binary tensor data extension (as
Triton and KServe define it) and the raw contents of the gRPC API.

A binary REST request is a JSON inference request followed by raw tensor bytes; the
``Inference-Header-Content-Length`` header gives the JSON part's length (the content type may
be ``application/octet-stream`` or ``application/json``: that header decides). An input whose
``parameters.binary_data_size`` is set has no ``data``: its bytes come next in the tail, in the
order of the inputs. Elements are flat, row-major, little-endian; ``BOOL`` is one byte (0 or 1);
a ``BYTES`` element is a 4-byte little-endian length and that many bytes (UTF-8 here).

Decoding turns each binary input into the ``data`` list a JSON request would have carried, so
the one V2 parser validates both forms alike. Outputs are sent binary when the request asks
(``parameters.binary_data_output``, or ``binary_data`` on a requested output).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson

from service.errors import BadRequest

HEADER = "inference-header-content-length"
OCTET_STREAM = "application/octet-stream"
DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "u1",
        "INT8": "<i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "UINT8": "<u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}
_LENGTH = struct.Struct("<I")
SMALL = 64
_unpackers: dict[tuple[str, int], Any] = {}
CODES = {  # struct codes, for decoding small tensors
    "BOOL": "B",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}


def element_count(name: str, shape: Any) -> int:
    """The number of elements of a tensor of ``shape`` (a list of non-negative integers)."""
    if type(shape) is list and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 0:
        return shape[0]  # the usual [N], at once
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers")
    count = 1
    for d in shape:
        count *= d
    return count


def decode_tensor(name: str, datatype: Any, raw: bytes | memoryview, count: int) -> list[Any]:
    """The ``count`` elements in ``raw`` as Python values (bool, int, float or str)."""
    if datatype == "BYTES":
        return _decode_bytes(name, raw, count)
    dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise BadRequest(f"input {name!r}: unknown datatype {datatype!r}")
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(
            f"input {name!r}: {count} {datatype} elements take {count * dtype.itemsize} bytes, "
            f"got {len(raw)}"
        )
    if count <= SMALL:  # struct is several times faster than numpy for a few values
        key = (datatype, count)
        unpack = _unpackers.get(key)
        if unpack is None:
            unpack = _unpackers[key] = struct.Struct(f"<{count}{CODES[datatype]}").unpack
        values: Any = unpack(raw)
        if datatype == "BOOL":
            if any(v > 1 for v in values):
                raise BadRequest(f"input {name!r}: a BOOL element must be the byte 0 or 1")
            return [v == 1 for v in values]
        return list(values)
    values = np.frombuffer(raw, dtype)
    if datatype == "BOOL":
        if values.size and values.max() > 1:
            raise BadRequest(f"input {name!r}: a BOOL element must be the byte 0 or 1")
        return (values != 0).tolist()
    return values.tolist()


def _decode_bytes(name: str, raw: bytes | memoryview, count: int) -> list[Any]:
    if count * _LENGTH.size > len(raw):  # before looping: a huge shape costs nothing
        raise BadRequest(f"input {name!r}: {len(raw)} bytes cannot hold {count} BYTES elements")
    out: list[Any] = []
    pos = 0
    view = memoryview(raw)
    for _ in range(count):
        if pos + 4 > len(view):
            raise BadRequest(f"input {name!r}: BYTES data ends inside element {len(out)}")
        (size,) = _LENGTH.unpack_from(view, pos)
        pos += 4
        if pos + size > len(view):
            raise BadRequest(f"input {name!r}: BYTES element {len(out)} runs past the data")
        try:
            out.append(str(view[pos : pos + size], "utf-8"))
        except UnicodeDecodeError:
            raise BadRequest(f"input {name!r}[{len(out)}]: not UTF-8 text") from None
        pos += size
    if pos != len(view):
        raise BadRequest(f"input {name!r}: {len(view) - pos} bytes after the last BYTES element")
    return out


def decode_request(body: bytes, header_length: str) -> Any:
    """A binary REST request as the JSON request it stands for (each binary input given its
    ``data``); or raise BadRequest."""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequest(
            f"header Inference-Header-Content-Length must be a byte count within the body "
            f"({len(body)} bytes), got {header_length[:40]!r}"
        )
    split = int(header_length)
    try:
        request = orjson.loads(body[:split])
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"the JSON part of the request is not valid JSON: {e}") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list):
        raise BadRequest("'inputs' must be a list of tensor objects")
    tail = memoryview(body)[split:]
    pos = 0
    for t in inputs:
        params = t.get("parameters") if isinstance(t, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        name = str(t.get("name"))[:100]
        size = params.pop("binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(tail) - pos:
            raise BadRequest(
                f"input {name!r}: binary_data_size must be a byte count within the "
                f"{len(tail) - pos} bytes left, got {size!r:.40}"
            )
        if "data" in t:
            raise BadRequest(f"input {name!r}: has both 'data' and binary_data_size")
        count = element_count(name, t.get("shape"))
        t["data"] = decode_tensor(name, t.get("datatype"), tail[pos : pos + size], count)
        pos += size
    if pos != len(tail):
        raise BadRequest(f"{len(tail) - pos} bytes after the last binary input")
    return request


def _flag(where: str, params: Any, key: str) -> bool | None:
    if not isinstance(params, dict) or key not in params:
        return None
    value = params[key]
    if not isinstance(value, bool):
        raise BadRequest(f"{where} parameter {key} must be true or false")
    return value


def binary_outputs(request: dict[str, Any], names: list[str]) -> set[str]:
    """The outputs the client wants as binary data: all with ``binary_data_output``, each
    requested output's own ``binary_data`` flag winning."""
    default = bool(_flag("request", request.get("parameters"), "binary_data_output"))
    per_output: dict[str, bool | None] = {}
    for o in request.get("outputs") or []:
        per_output[o["name"]] = _flag(f"output {o['name']!r}", o.get("parameters"), "binary_data")
    return {n for n in names if (default if per_output.get(n) is None else per_output[n]) is True}


def encode(datatype: str, values: np.ndarray) -> bytes:
    """A numeric or BOOL output's elements as raw little-endian bytes."""
    return np.ascontiguousarray(values, DTYPES[datatype]).tobytes()


def response(
    out: dict[str, Any], arrays: dict[str, np.ndarray], binary: set[str]
) -> tuple[bytes, int]:
    """(body, JSON header length) of a response whose ``binary`` outputs go as raw bytes."""
    blobs = []
    for o in out["outputs"]:
        if o["name"] in binary:
            blob = encode(o["datatype"], arrays[o["name"]])
            del o["data"]
            o["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
    header = orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)
    return b"".join([header, *blobs]), len(header)
