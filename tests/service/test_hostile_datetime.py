"""Date-time fields against any date-time Python can hold, and any text (fast tier): time
features or a named reason, never an exception. Read in UTC, the first and last days a datetime
holds used to overflow (``0001-01-01T00:30:00+01:00`` is in year 0 in UTC): a 500 from
``/v1/score`` and V2 infer, a crash of ``vae-anomaly score`` and of training."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.bundle import DateTimeColumn
from service.timefeatures import DAY, EPOCH_WEEKDAY, NotADateTime, clock, derive, is_missing

ALL = ["hour_sin", "hour_cos", "dow_sin", "dow_cos"]
COLUMNS = {
    tz: DateTimeColumn(name="when", unit="iso", timezone=tz, nullable=True, derived=ALL)
    for tz in ("utc", "local")
}
offsets = st.timedeltas(
    min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)
)
aware = st.builds(
    lambda d, off: d.replace(tzinfo=timezone(off)),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    offsets,
)


def utc_clock(d: datetime) -> tuple[float, float]:
    """(seconds into the UTC day, UTC weekday) by the seconds since 1970 (no datetime is made
    in UTC, so none can overflow)."""
    secs = (d - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()
    days = math.floor(secs / DAY)
    return secs - days * DAY, float((days + EPOCH_WEEKDAY) % 7)


@given(aware)
def test_utc_time_features_of_any_date_time(d: datetime) -> None:
    got = clock(d.isoformat(), COLUMNS["utc"])
    want = utc_clock(d)
    assert got[1] == want[1]
    assert got[0] == pytest.approx(want[0], abs=1e-3)
    assert clock(d, COLUMNS["utc"]) == got  # a datetime (a Parquet cell) as its text


@pytest.mark.parametrize(
    ("text", "seconds", "weekday"),
    [
        ("0001-01-01T00:30:00+01:00", 84_600.0, 6),  # a Monday, 23:30 on the Sunday before
        ("9999-12-31T23:30:00-01:00", 1_800.0, 5),  # a Friday, 00:30 on the Saturday after
        ("0001-01-01T00:00:00+00:00", 0.0, 0),
    ],
)
def test_the_edges_of_the_calendar_read_in_utc(text: str, seconds: float, weekday: int) -> None:
    assert clock(text, COLUMNS["utc"]) == (seconds, weekday)
    features, bad = derive([text], COLUMNS["utc"])
    assert not bad and all(math.isfinite(v[0]) for v in features.values())


@given(st.one_of(st.text(max_size=70), st.integers(), st.floats(), st.none(), st.booleans()))
def test_any_value_gives_features_or_a_reason(v: object) -> None:
    for col in COLUMNS.values():
        features, bad = derive([v], col)
        assert all(isinstance(e, NotADateTime) and e.reason for _, e in bad)
        if not bad and not is_missing(v):
            assert all(math.isfinite(f[0]) for f in features.values()), v
