"""Any JSON value at any place of a V2 inference request, JSON or binary (fast tier, in
process): a 200 or a 400 with the protocol's error object, never a 500. A list or an object
where a name is expected (a score type, an output, an input's name or datatype) used to reach
a dict lookup and fail as unhashable."""

from __future__ import annotations

import copy
import json
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.bundle import read_bundle
from service.errors import BadRequest
from service.settings import Settings
from service.v2_request import parse
from tests.conftest import InProcess, in_process, records, v2_body
from training.demo_data import generate_payments

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["score", "elbo", "FP64", "BYTES", "amount", "country"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)

Body = dict[str, Any]
Place = Callable[[Body, Any], None]


def _input(i: int, key: str) -> Place:
    def put(b: Body, v: Any) -> None:
        b["inputs"][i][key] = v

    return put


def _at(*path: str) -> Place:
    """``body[path[0]]...[path[-1]] = v``, making objects on the way."""

    def put(b: Body, v: Any) -> None:
        for k in path[:-1]:
            if not isinstance(b.get(k), dict):
                b[k] = {}
            b = b[k]
        b[path[-1]] = v

    return put


PLACES: dict[str, Place] = {
    "id": _at("id"),
    "parameters": _at("parameters"),
    "score_type": _at("parameters", "score_type"),
    "binary_data_output": _at("parameters", "binary_data_output"),
    "outputs": _at("outputs"),
    "an output's name": lambda b, v: b.update(outputs=[{"name": v}]),
    "an output's parameters": lambda b, v: b.update(outputs=[{"name": "score", "parameters": v}]),
    "an output's binary_data": lambda b, v: b.update(
        outputs=[{"name": "score", "parameters": {"binary_data": v}}]
    ),
    "inputs": _at("inputs"),
    "one more input": lambda b, v: b["inputs"].append(v),
    **{
        f"an input's {k}": _input(0, k) for k in ("name", "datatype", "shape", "data", "parameters")
    },
    **{f"a categorical's {k}": _input(6, k) for k in ("name", "datatype", "shape", "data")},
    "a dimension": lambda b, v: b["inputs"][0].update(shape=[v]),
    "a value": lambda b, v: b["inputs"][0].update(data=[v]),
    "a category": lambda b, v: b["inputs"][6].update(data=[v]),
    "a second dimension": lambda b, v: b["inputs"][0].update(shape=[1, v]),
}


@pytest.fixture(scope="module")
def client(bundle_dir: Path) -> Iterator[InProcess]:
    with in_process(bundle_dir) as c:
        yield c


@pytest.fixture(scope="module")
def base(bundle_dir: Path) -> Body:
    df = generate_payments(1, seed=310)
    rec = records(df.fillna({"device": "mobile", "distance_from_home_km": 2.0, "customer_age": 40}))
    body = v2_body(bundle_dir, rec[0])
    assert body["inputs"][6]["datatype"] == "BYTES"  # a categorical, for the places above
    return body


@pytest.fixture(scope="module")
def url(bundle_dir: Path) -> str:
    return f"/v2/models/{read_bundle(bundle_dir).manifest.name}/infer"


def binary(body: Body) -> tuple[bytes, dict[str, str]]:
    """``body`` with its last input's data sent as binary tensor data (as tritonclient does),
    whatever else the body holds."""
    body = copy.deepcopy(body)
    tail = b""
    inputs = body.get("inputs")
    if isinstance(inputs, list) and inputs and isinstance(inputs[-1], dict):
        data = inputs[-1].pop("data", [])
        texts = data if isinstance(data, list) else [data]
        tail = b"".join(struct.pack("<I", len(b)) + b for b in map(_bytes, texts))
        inputs[-1]["parameters"] = {"binary_data_size": len(tail)}
    head = json.dumps(body).encode()  # (orjson refuses integers beyond 64 bits)
    headers = {"inference-header-content-length": str(len(head)), "content-type": "text/plain"}
    return head + tail, headers


def _bytes(v: Any) -> bytes:
    return (v if isinstance(v, str) else json.dumps(v)).encode()


def _answer_is_200_or_a_400_error(r: Any, place: str, value: Any) -> None:
    assert r.status_code in (200, 400), (place, value, r.status_code, r.text[:300])
    if r.status_code == 400:
        error = r.json()
        assert set(error) == {"error"} and isinstance(error["error"], str), error
        assert len(r.content) < 2_000, (place, r.text[:300])  # a message, not an echo


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(place=st.sampled_from(sorted(PLACES)), value=json_values)
def test_any_value_anywhere_in_a_v2_request_is_a_200_or_a_400(
    client: InProcess, base: Body, url: str, place: str, value: Any
) -> None:
    body = copy.deepcopy(base)
    PLACES[place](body, value)
    r = client.post(url, json=body)
    _answer_is_200_or_a_400_error(r, place, value)
    content, headers = binary(body)
    _answer_is_200_or_a_400_error(client.post(url, content=content, headers=headers), place, value)


@pytest.mark.parametrize(
    ("place", "value", "expected"),
    [
        ("score_type", ["elbo"], "score_type must be one of"),
        ("score_type", {"elbo": 1}, "score_type must be one of"),
        ("an output's name", ["score"], "unknown output(s) [['score']]"),
        ("an input's datatype", ["FP64"], "unknown datatype ['FP64']"),
        ("an input's name", {"amount": 1}, "string 'name'"),
    ],
)
def test_a_list_or_an_object_for_a_name_is_a_400_naming_it(
    client: InProcess, base: Body, url: str, place: str, value: Any, expected: str
) -> None:
    body = copy.deepcopy(base)
    PLACES[place](body, value)
    for content, headers in (
        (json.dumps(body).encode(), {"content-type": "application/json"}),
        binary(body),
    ):
        r = client.post(url, content=content, headers=headers)
        assert r.status_code == 400, (place, r.text)
        assert expected in r.json()["error"], r.text


def test_an_error_lists_a_few_of_many_unknown_names(
    client: InProcess, base: Body, url: str
) -> None:
    body = copy.deepcopy(base)
    body["inputs"] += [
        {"name": f"x{i}", "datatype": "FP64", "shape": [1], "data": [1]} for i in range(5000)
    ]
    body["outputs"] = [{"name": f"o{i}"} for i in range(5000)]
    r = client.post(url, json=body)
    assert r.status_code == 400 and "and 4990 more" in r.json()["error"], r.text[:300]
    assert len(r.content) < 2_000
    del body["outputs"]
    r = client.post(url, json=body)
    assert r.status_code == 400 and "and 4990 more" in r.json()["error"], r.text[:300]
    assert len(r.content) < 2_000


def test_the_unchanged_request_scores_as_json_and_as_binary(
    client: InProcess, base: Body, url: str
) -> None:
    """What the property above changes is a request that scores (a 400 there is the change's)."""
    assert client.post(url, json=base).status_code == 200
    content, headers = binary(base)
    r = client.post(url, content=content, headers=headers)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("fast", [True, False])
def test_a_binary_input_of_more_elements_than_records_is_refused_unread(
    bundle_dir: Path, fast: bool
) -> None:
    """16 MB of empty BYTES elements are 4 million of them: refused before a list of 4 million
    strings is made (seconds of work, tens of MB, for a request that cannot be scored)."""
    m = read_bundle(bundle_dir).manifest
    settings = Settings(bundle=bundle_dir)
    n = 4_000_000
    tail = struct.pack("<I", 0) * n
    tensor = {"name": "country", "datatype": "BYTES", "shape": [n]}
    params = {"binary_data_size": len(tail)} | ({} if fast else {"note": "x"})  # (not fast)
    head = json.dumps({"inputs": [tensor | {"parameters": params}]}).encode()
    request, raw = json.loads(head), head + tail
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest, match=f"{n} elements; a request holds 1 to 10000"):
            parse(request, m, settings, (raw, len(head)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, peak


def test_a_long_model_name_or_version_is_not_echoed_whole(client: InProcess, base: Body) -> None:
    for path in (
        f"/v2/models/{'x' * 20_000}/infer",
        f"/v2/models/payments/versions/{'9' * 20_000}/infer",
    ):
        r = client.post(path, json=base)
        assert r.status_code == 404 and len(r.content) < 500, (r.status_code, len(r.content))
