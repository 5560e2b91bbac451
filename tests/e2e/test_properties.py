"""Property-based tests (hypothesis): any JSON in any field gets a 2xx or a 4xx, never a 5xx,
and never changes which model serves or how it scores."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.features import encode_columns
from service.runtime import open_bundle
from tests.conftest import Server, run_server
from training.demo_data import generate_payments

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=300),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(["serve", "--bundle", str(bundle_dir)], tmp_path_factory.mktemp("prop")) as s:
        yield s


@pytest.fixture(scope="module")
def base_record() -> dict[str, Any]:
    rec = generate_payments(1, seed=200).iloc[0].to_dict()
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    field=st.sampled_from(
        [
            "amount",
            "hour",
            "merchant_category",
            "country",
            "card_present",
            "distance_from_home_km",
            "customer_age",
            "tx_last_24h",
            "device",
            "transaction_id",
            "something_else",
        ]
    ),
    value=json_values,
)
def test_any_value_in_any_field_is_a_2xx_or_4xx(
    server: Server, base_record: dict[str, Any], field: str, value: Any
) -> None:
    r = httpx.post(
        f"{server.url}/v1/score", json={"records": [{**base_record, field: value}]}, timeout=30
    )
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        assert math.isfinite(r.json()["results"][0]["score"])
    else:
        assert r.json()["errors"][0]["record"] == 0


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=json_values)
def test_any_json_body_is_a_4xx_at_worst(server: Server, body: Any) -> None:
    for path in ("/v1/score", "/v2/models/payments/infer"):
        r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
        assert 400 <= r.status_code < 500, (path, r.text)


def test_the_fuzzing_changed_nothing(
    server: Server, bundle_dir: Path, base_record: dict[str, Any]
) -> None:
    """After everything above, the same model answers with the same scores."""
    bundle, model = open_bundle(bundle_dir)
    ready = httpx.get(f"{server.url}/readyz", timeout=30).json()
    assert ready["version"] == bundle.manifest.version
    got = httpx.post(f"{server.url}/v1/score", json={"records": [base_record]}, timeout=30).json()[
        "results"
    ][0]["score"]
    cols = {f.name: [base_record.get(f.name)] for f in bundle.manifest.features}
    want = float(model.run(encode_columns(bundle.manifest.features, cols).inputs)["elbo"][0])
    assert got == pytest.approx(want, rel=1e-6)
    assert np.isfinite(got)
