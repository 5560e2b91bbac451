"""Binary tensors of the Open Inference Protocol: the REST binary tensor data extension (as
Triton and KServe define it) and the raw contents of the gRPC API.

A binary REST request is a JSON inference request followed by raw tensor bytes; the
``Inference-Header-Content-Length`` header gives the JSON part's length (the content type may
be ``application/octet-stream`` or ``application/json``: that header decides). An input whose
``parameters.binary_data_size`` is set has no ``data``: its bytes come next in the tail, in the
order of the inputs. Elements are flat, row-major, little-endian; ``BOOL`` is one byte (0 or 1);
a ``BYTES`` element is a 4-byte little-endian length and that many bytes (UTF-8 here).

Decoding gives each binary input its ``data`` as the JSON request would have carried it, but
as an array (numbers and BOOL: a numpy view of the body's bytes, no Python object per element;
BYTES: a list of str), which the one V2 parser validates array-wide by the same rules and with
the same messages as JSON data. Outputs are sent binary when the request asks
(``parameters.binary_data_output``, or ``binary_data`` on a requested output), encoded from
their arrays at once.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from service import values
from service.errors import BadRequest

HEADER = b"inference-header-content-length"  # as ASGI gives header names
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
# tensors of at most FEW elements are read with struct on the hot path: numpy's fixed cost per
# call (frombuffer, the finiteness check, the cast: ~0.5 us) is more than a few Python numbers
FEW = 16
_unpackers: dict[tuple[str, int], Any] = {}
CODES = {"INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B", "UINT16": "H"}
CODES |= {"UINT32": "I", "UINT64": "Q", "FP16": "e", "FP32": "f", "FP64": "d"}  # struct's


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


def at_most(name: str, count: int, most: int) -> int:
    """``count``, the elements of input ``name``, unless a request may not hold so many: an
    input is refused by its count before its elements are read (16 MB of empty BYTES elements
    are 4 million, seconds of work for a request that cannot be scored)."""
    if count > most:
        raise BadRequest(f"input {name!r}: {count} elements; a request holds 1 to {most} records")
    return count


def decode_tensor(
    name: str, datatype: Any, raw: bytes | memoryview, count: int
) -> np.ndarray | list[str]:
    """The ``count`` elements in ``raw``: an array of the datatype (numbers, BOOL as
    ``bool``; a view of ``raw``, no per-element work), or a list of str (BYTES)."""
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
    if datatype == "BOOL":
        if bytes(raw).translate(None, b"\x00\x01"):  # a byte other than 0 and 1 is left
            raise BadRequest(f"input {name!r}: a BOOL element must be the byte 0 or 1")
        return np.frombuffer(raw, np.bool_)
    return np.frombuffer(raw, dtype)


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


def header_length(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The ``Inference-Header-Content-Length`` header of a request (its raw ASGI headers: on the
    hot path, cheaper than Starlette's Headers), or None."""
    for k, v in headers:
        if k == HEADER:
            return v.decode("latin-1")
    return None


def split_request(body: bytes, header_length: str) -> tuple[Any, int]:
    """(the JSON part of a binary REST request, parsed; where its tensors' bytes start); or
    raise BadRequest."""
    # isdigit() alone takes "²" (a Latin-1 header byte) for a digit, which int() refuses
    if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
        raise BadRequest(
            f"header Inference-Header-Content-Length must be a byte count within the body "
            f"({len(body)} bytes), got {header_length[:40]!r}"
        )
    split = int(header_length)
    try:
        return values.json_loads(memoryview(body)[:split]), split
    except ValueError as e:
        raise BadRequest(f"the JSON part of the request is not valid JSON: {e}") from None


def decode_inputs(inputs: list[dict[str, Any]], body: bytes, pos: int, most: int) -> None:
    """Give each binary input (``parameters.binary_data_size``) its ``data``, from the bytes
    of ``body`` from ``pos`` on, in order; or raise BadRequest (an input of more than ``most``
    elements among them: :func:`at_most`)."""
    view, end = memoryview(body), len(body)
    for t in inputs:
        params = t.get("parameters")
        if type(params) is not dict or "binary_data_size" not in params:
            continue
        name = str(t.get("name"))[:100]
        size = params.pop("binary_data_size")
        if type(size) is not int or not 0 <= size <= end - pos:
            raise BadRequest(
                f"input {name!r}: binary_data_size must be a byte count within the "
                f"{end - pos} bytes left, got {size!r:.40}"
            )
        if "data" in t:
            raise BadRequest(f"input {name!r}: has both 'data' and binary_data_size")
        count = at_most(name, element_count(name, t.get("shape")), most)
        t["data"] = decode_tensor(name, t.get("datatype"), view[pos : pos + size], count)
        pos += size
    if pos != end:
        raise BadRequest(f"{end - pos} bytes after the last binary input")


def fast_columns(
    inputs: list[dict[str, Any]],
    body: bytes,
    pos: int,
    kinds: Mapping[str, str],
    max_len: int,
    most: int,
) -> dict[str, np.ndarray | list[Any]] | None:
    """The columns of binary inputs in their usual form, decoded and checked array-wide in one
    pass (the hot path: no per-element Python work for numbers and booleans, but for a few of
    them, see ``FEW``): every input a
    binary tensor of shape ``[N]`` for a feature of ``kinds`` (name -> numeric, boolean or
    categorical), numbers in any numeric datatype (floats finite) as float64, booleans as
    BOOL, categoricals as BYTES (within ``max_len``), at most ``most`` elements each. None
    when anything is otherwise: then :func:`decode_inputs` and the parser's closer look give
    the same values, or the error."""
    columns: dict[str, np.ndarray | list[Any]] = {}
    end = len(body)
    for t in inputs:
        name, shape, params = t.get("name"), t.get("shape"), t.get("parameters")
        kind = kinds.get(name) if type(name) is str else None  # (a list is unhashable)
        if kind is None or name in columns or "data" in t or type(params) is not dict:
            return None
        size = params.get("binary_data_size")
        if type(size) is not int or not 0 <= size <= end - pos or len(params) != 1:
            return None
        if type(shape) is not list or len(shape) != 1 or type(shape[0]) is not int:
            return None
        if shape[0] > most:
            return None
        values = _usual(kind, t.get("datatype"), body, pos, size, shape[0])
        if values is None or (kind == "categorical" and max(map(len, values), default=0) > max_len):
            return None
        columns[name] = values  # type: ignore[index]
        pos += size
    return columns if pos == end else None


def _usual(
    kind: str, dt: Any, body: bytes, pos: int, size: int, count: int
) -> np.ndarray | list[Any] | None:
    """One input's values for :func:`fast_columns`, or None."""
    if count < 0:
        return None
    if kind == "categorical":
        if dt != "BYTES":
            return None
        try:
            if count == 1 and size >= 4 and _LENGTH.unpack_from(body, pos)[0] == size - 4:
                return [str(body[pos + 4 : pos + size], "utf-8")]  # one record: at once
            return _decode_bytes("", memoryview(body)[pos : pos + size], count)
        except (BadRequest, UnicodeDecodeError):  # decode_inputs names the input
            return None
    dtype = DTYPES.get(dt) if type(dt) is str else None
    if dtype is None or size != count * dtype.itemsize or (dt == "BOOL") != (kind == "boolean"):
        return None
    if dt == "BOOL":
        if body[pos : pos + size].translate(None, b"\x00\x01"):  # a byte other than 0 or 1
            return None
        if count <= FEW:
            return [b == 1 for b in body[pos : pos + size]]
        return np.frombuffer(body, np.bool_, count, pos)
    if count <= FEW:
        unpack = _unpackers.get((dt, count))
        if unpack is None:
            unpack = _unpackers[dt, count] = struct.Struct(f"<{count}{CODES[dt]}").unpack_from
        few = unpack(body, pos)
        if dt[0] != "F":
            return [float(v) for v in few]  # as JSON's numbers would be
        return list(few) if math.isfinite(sum(few)) else None
    values = np.frombuffer(body, dtype, count, pos)
    if dt[0] == "F" and not finite(values):
        return None
    return values.astype(np.float64)


def finite(a: np.ndarray) -> bool:
    """No NaN or infinity in ``a`` (a few values: summed as Python floats, several times faster
    than numpy's check; a sum that overflows is checked again value by value)."""
    if len(a) <= 16 and math.isfinite(sum(a.tolist())):
        return True
    return bool(np.isfinite(a).all())


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
