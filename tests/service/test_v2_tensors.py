"""V2 binary tensors (the binary tensor data extension) decoded in process: numbers as numpy
wrote them (as arrays), BYTES in Triton's format, malformed tensors refused with a message."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tritonclient.utils import serialize_byte_tensor

from service import v2_binary
from service.errors import BadRequest


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("FP32", np.array([1.5, -2.25, 3e38], np.float32)),
        ("FP64", np.array([1e-300, -0.0, 12345.678], np.float64)),
        ("FP16", np.array([0.5, 2.0], np.float16)),
        ("INT8", np.array([-128, 127], np.int8)),
        ("UINT16", np.array([0, 65535], np.uint16)),
        ("INT64", np.array([-(2**63), 2**63 - 1], np.int64)),
        ("UINT64", np.array([2**64 - 1], np.uint64)),
        ("BOOL", np.array([True, False, True])),
    ],
)
def test_numeric_tensors_decode_as_numpy_wrote_them(datatype: str, values: np.ndarray) -> None:
    raw = values.astype(values.dtype.newbyteorder("<")).tobytes()
    decoded = v2_binary.decode_tensor("x", datatype, raw, len(values))
    assert isinstance(decoded, np.ndarray)  # the bytes as an array: no object per element
    assert decoded.tolist() == values.tolist()
    if datatype != "FP16":
        assert v2_binary.encode(datatype, values) == raw


def test_bytes_tensors_are_tritons_format() -> None:
    words = ["grocery", "", "Zürich ☃", "x" * 300]
    raw = serialize_byte_tensor(np.array([w.encode() for w in words], dtype=object)).item()
    assert v2_binary.decode_tensor("c", "BYTES", raw, len(words)) == words


@pytest.mark.parametrize(
    ("datatype", "raw", "count", "message"),
    [
        ("FP32", b"\0" * 7, 2, "take 8 bytes, got 7"),
        ("BOOL", b"\x00\x02", 2, "0 or 1"),
        ("BYTES", struct.pack("<I", 5) + b"abc", 1, "runs past"),
        ("BYTES", struct.pack("<I", 1) + b"a" + b"\0\0", 1, "after the last"),
        ("BYTES", struct.pack("<I", 2) + b"\xff\xfe", 1, "UTF-8"),
        ("BYTES", b"\0" * 8, 10**15, "cannot hold"),
        ("COMPLEX", b"", 0, "unknown datatype"),
    ],
)
def test_malformed_tensors_are_refused(datatype: str, raw: bytes, count: int, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        v2_binary.decode_tensor("x", datatype, raw, count)
