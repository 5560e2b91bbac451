"""A client for the service's native HTTP API: ``Client`` (blocking) and ``AsyncClient``.

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        results = client.score(df)            # a pandas DataFrame, or a list of dicts
        flagged = [r for r in results if r.is_anomaly]

Records go in chunks of ``chunk_size`` per request, in order; each result says which model
version scored it (a promotion during a long job shows as a change of version). A 503 (the
service is starting, reloading or overloaded), a 502/504 from a proxy and a failed connection
are retried with exponential backoff and jitter; a 4xx never is: it raises a
:class:`RequestError` carrying the service's per-record messages, their record numbers counted
from the start of *your* input. Scoring is read-only, so a retried request is safe (a retried
chunk may be counted twice in the service's metrics).

Values are sent as JSON the service reads: NaN, None and pandas' missing markers become
``null`` (missing), numpy scalars plain numbers, timestamps ISO 8601 strings.
Needs ``httpx`` (the ``client`` extra); pandas only if you pass a DataFrame.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

import httpx

RETRY_STATUSES = frozenset({502, 503, 504})
TRANSPORT_ERRORS = (httpx.TransportError,)  # connect, read, write, timeouts, protocol errors


class ClientError(Exception):
    """Base of the client's errors."""


class RequestError(ClientError):
    """The service refused a request (4xx), or gave up on it (5xx after the retries).

    ``errors`` are the service's per-record messages (``record``, ``field``, ``reason``,
    ``message``), with ``record`` counted from the start of the records given to ``score``."""

    def __init__(self, status: int, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.errors = errors


class AuthError(RequestError):
    """401 (no API key) or 403 (a wrong one)."""


class Unavailable(ClientError):
    """The service could not be reached, or kept answering 502/503/504, through every retry."""


@dataclass(frozen=True)
class Result:
    """One record's result; ``error`` is set (and the rest empty) for a record the service
    skipped as invalid (``on_invalid="skip"``)."""

    score: float | None
    is_anomaly: bool | None
    threshold: float | None
    percentile: float | None
    model: str
    model_version: str
    top_features: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # any other field of the result
    error: Any = None


# ---------------------------------------------------------------- what both clients share


def to_json_value(v: Any) -> Any:
    """A record's value as JSON the service reads (None = missing; an infinity is sent as
    ``Infinity``, for the service to name, never as missing)."""
    if v is None or isinstance(v, str | bool | int):
        return v
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if type(v).__name__ in ("NAType", "NaTType"):  # pandas' missing markers
        return None
    if isinstance(v, dt.datetime | dt.date):
        return v.isoformat()
    item = getattr(v, "item", None)  # numpy scalars (and 0-d arrays)
    if callable(item) and getattr(v, "ndim", 0) == 0:
        try:
            return to_json_value(item())
        except (TypeError, ValueError):
            pass
    isoformat = getattr(v, "isoformat", None)  # pandas.Timestamp, numpy datetime64 via item()
    if callable(isoformat):
        return isoformat()
    if isinstance(v, Mapping | list | tuple):
        return v  # not a value of any field: the service says which field, and why
    return str(v)


def as_records(data: Any) -> list[dict[str, Any]]:
    """A pandas DataFrame, a pyarrow Table or an iterable of mappings, as JSON-ready dicts."""
    if hasattr(data, "to_pylist"):  # pyarrow.Table
        rows: Iterable[Mapping[str, Any]] = data.to_pylist()
    elif hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas.DataFrame
        rows = data.to_dict(orient="records")
    elif isinstance(data, Mapping):
        raise TypeError("score() takes many records: a list of dicts or a DataFrame, not a dict")
    else:
        rows = data
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"record {i} is a {type(row).__name__}, not a mapping")
        out.append({str(k): to_json_value(v) for k, v in row.items()})
    return out


def dumps(body: Any) -> bytes:
    """JSON bytes; the standard library writes infinities as ``Infinity`` (orjson would write
    ``null``, turning a value into a missing one), which the service reads."""
    return json.dumps(body, allow_nan=True, separators=(",", ":")).encode()


def chunks(records: list[dict[str, Any]], size: int) -> Iterator[tuple[int, list[Any]]]:
    for start in range(0, len(records), size):
        yield start, records[start : start + size]


class ScoreOptions(TypedDict, total=False):
    """The keyword options of ``score`` (None: the service's default)."""

    score_type: str | None  # elbo, recon or iwae
    explain: int | None  # how many features to name per record
    on_invalid: str | None  # what the service does with an invalid record (skip: a Result.error)


QUERY_NAMES = {"score_type": "score", "explain": "explain", "on_invalid": "on_invalid"}


def params(options: ScoreOptions) -> dict[str, Any]:
    """The query parameters of a scoring request."""
    unknown = sorted(options.keys() - QUERY_NAMES.keys())
    if unknown:  # as a function with these keyword arguments would say
        raise TypeError(f"score() got unexpected keyword arguments {unknown}")
    return {QUERY_NAMES[k]: v for k, v in options.items() if v is not None}


def parse_results(body: Any) -> list[Result]:
    model = body.get("model", {})
    name, version = str(model.get("name", "")), str(model.get("version", ""))
    out = []
    for r in body["results"]:
        if "error" in r and "score" not in r:
            out.append(Result(None, None, None, None, name, version, error=r["error"]))
            continue
        known = {"score", "is_anomaly", "threshold", "percentile", "top_features"}
        out.append(
            Result(
                score=r["score"],
                is_anomaly=r["is_anomaly"],
                threshold=r["threshold"],
                percentile=r["percentile"],
                model=name,
                model_version=version,
                top_features=r.get("top_features", []),
                extra={k: v for k, v in r.items() if k not in known},
            )
        )
    return out


def raise_for(response: httpx.Response, offset: int) -> None:
    """Raise the typed error for a refused request; record numbers shifted by ``offset``."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    message = str(body.get("error") or response.reason_phrase or "error")
    errors = []
    for e in body.get("errors") or []:
        if isinstance(e, dict):
            e = dict(e)
            if isinstance(e.get("record"), int):
                e["record"] += offset
            errors.append(e)
    cls = AuthError if response.status_code in (401, 403) else RequestError
    raise cls(response.status_code, message, errors)


class _Retry:
    """When to try again: exponential backoff with full jitter, capped; ``Retry-After`` in
    seconds is honoured (up to the cap)."""

    def __init__(self, retries: int, backoff: float, max_backoff: float) -> None:
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        after = response.headers.get("retry-after", "") if response is not None else ""
        if after.isdigit():
            return min(float(after), self.max_backoff)
        return random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))


RETRY = object()  # what _settle answers for a response worth another try


class Options(TypedDict, total=False):
    """The keyword options both clients take (defaults in :class:`_Base`)."""

    chunk_size: int  # records per request
    retries: int  # further tries of a request that met a 502/503/504 or a failed connection
    backoff: float  # the first retry's greatest delay, in seconds; doubled per retry
    max_backoff: float  # the greatest delay, in seconds (a Retry-After too)
    timeout: float  # per request, in seconds


class _Base:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        chunk_size: int = 1000,
        retries: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        timeout: float = 30.0,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.url = url.rstrip("/")
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.chunk_size = chunk_size
        self.retry = _Retry(retries, backoff, max_backoff)
        self.timeout = timeout

    def _settle(self, response: httpx.Response | None, offset: int) -> Any:
        """The body of a good response, RETRY, or raise the typed error of a refusal."""
        if response is None or response.status_code in RETRY_STATUSES:
            return RETRY
        if response.status_code >= 400:
            raise_for(response, offset)
        return response.json()

    def _give_up(self, response: httpx.Response | None, error: Exception | None) -> ClientError:
        if response is not None:
            return Unavailable(f"{self.url}: {response.status_code} after the retries")
        return Unavailable(f"{self.url}: {error!r} after the retries")


# ---------------------------------------------------------------- the clients


class Client(_Base):
    """Blocking client; its keyword options are :class:`Options`."""

    def __init__(self, url: str, api_key: str | None = None, **options: Unpack[Options]) -> None:
        super().__init__(url, api_key, **options)
        self.http = httpx.Client(timeout=self.timeout, headers=self.headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def score(self, records: Any, **options: Unpack[ScoreOptions]) -> list[Result]:
        """Score records (a DataFrame, an Arrow table or dicts), one result each, in order."""
        rows = as_records(records)
        query = params(options)
        results: list[Result] = []
        for start, chunk in chunks(rows, self.chunk_size):
            body = self._send("POST", "/v1/score", dumps({"records": chunk}), query, start)
            results += parse_results(body)
        return results

    def model(self) -> dict[str, Any]:
        """What the service is serving (``GET /v1/model``)."""
        out: dict[str, Any] = self._send("GET", "/v1/model", None, {}, 0)
        return out

    def ready(self) -> bool:
        try:
            return self.http.get(f"{self.url}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def _send(
        self, method: str, path: str, content: bytes | None, query: dict[str, Any], offset: int
    ) -> Any:
        for attempt in range(self.retry.retries + 1):
            response, error = None, None
            try:
                response = self.http.request(method, self.url + path, content=content, params=query)
            except TRANSPORT_ERRORS as e:
                error = e
            if (body := self._settle(response, offset)) is not RETRY:
                return body
            if attempt < self.retry.retries:
                time.sleep(self.retry.delay(attempt, response))
        raise self._give_up(response, error)


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client`: the same methods, awaited. ``concurrency`` chunks
    of one ``score`` call are in flight at once (results stay in order)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        concurrency: int = 4,
        **options: Unpack[Options],
    ) -> None:
        super().__init__(url, api_key, **options)
        self.http = httpx.AsyncClient(timeout=self.timeout, headers=self.headers)
        self.concurrency = max(1, concurrency)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def score(self, records: Any, **options: Unpack[ScoreOptions]) -> list[Result]:
        rows = as_records(records)
        query = params(options)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(start: int, chunk: Sequence[Any]) -> list[Result]:
            async with gate:
                content = dumps({"records": chunk})
                body = await self._send("POST", "/v1/score", content, query, start)
            return parse_results(body)

        tasks = [one(start, chunk) for start, chunk in chunks(rows, self.chunk_size)]
        parts = await asyncio.gather(*tasks)
        return [r for part in parts for r in part]

    async def model(self) -> dict[str, Any]:
        out: dict[str, Any] = await self._send("GET", "/v1/model", None, {}, 0)
        return out

    async def ready(self) -> bool:
        try:
            return (await self.http.get(f"{self.url}/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def _send(
        self, method: str, path: str, content: bytes | None, query: dict[str, Any], offset: int
    ) -> Any:
        for attempt in range(self.retry.retries + 1):
            response, error = None, None
            try:
                response = await self.http.request(
                    method, self.url + path, content=content, params=query
                )
            except TRANSPORT_ERRORS as e:
                error = e
            if (out := self._settle(response, offset)) is not RETRY:
                return out
            if attempt < self.retry.retries:
                await asyncio.sleep(self.retry.delay(attempt, response))
        raise self._give_up(response, error)
