"""The request kinds of the soak test (bench/soak.py), as data: for each, its name, its share of
the traffic, how to build its requests from demo records, and the answer it must get."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

MODEL = "soak"
MAX_RECORDS = 1000  # the service's limit for this run (VAE_ANOMALY_MAX_RECORDS)
MAX_BODY = 1024 * 1024  # VAE_ANOMALY_MAX_BODY_BYTES
BATCH = 100  # records in a "batch" request
JSON = "application/json"
INFER = f"/v2/models/{MODEL}/infer"

Variant = tuple[str, bytes | None, str | None]  # path, body, content type
Verdict = tuple[str | None, str | None]  # what is wrong with an answer (None: fine), its version


# ---------------------------------------------------------------- what an answer must be


def scored(kind: Kind, r: httpx.Response) -> Verdict:
    """One result per record sent, naming the model version (native or V2)."""
    body = r.json()
    if "results" in body:
        n = len(body["results"])
        return (None if n == kind.records else f"{n} results for {kind.records}"), body["model"][
            "version"
        ]
    shape = (body.get("outputs") or [{}])[0].get("shape")
    if shape != [kind.records] or not str(body.get("id", "")).startswith("req-"):
        return f"bad V2 answer {str(body)[:200]}", None
    return None, body["model_version"]


def refused(kind: Kind, r: httpx.Response) -> Verdict:
    """A JSON error body; for a native 422, the expected reason among its errors."""
    body = r.json()
    if not isinstance(body, dict) or "error" not in body:
        return f"no 'error' in {r.content[:200]!r}", None
    reasons = {e.get("reason") for e in body.get("errors", [])}
    if kind.reason is not None and kind.reason not in reasons:
        return f"reasons {sorted(map(str, reasons))}, expected {kind.reason}", None
    return None, None


def model_info(kind: Kind, r: httpx.Response) -> Verdict:
    return None, r.json().get("version")


def metrics_text(kind: Kind, r: httpx.Response) -> Verdict:
    return (None if b"vae_anomaly_http_requests_total" in r.content else "no metrics"), None


def any_answer(kind: Kind, r: httpx.Response) -> Verdict:
    return None, None


# ---------------------------------------------------------------- building requests

Make = Callable[["Builder"], list[Variant]]  # how a kind's request variants are made
Edit = Callable[[Any], Any]  # records -> a native body, or a V2 body -> a V2 body


class Builder:
    """Makes request variants from demo records (``recs``) for a model with ``features``."""

    def __init__(self, recs: list[dict[str, Any]], features: list[dict[str, Any]]) -> None:
        self.recs, self.features, self.rng = recs, features, random.Random(1)

    def some(self, k: int) -> list[dict[str, Any]]:
        i = self.rng.randrange(len(self.recs) - k)
        return [dict(r) for r in self.recs[i : i + k]]

    def tensors(self, recs: list[dict[str, Any]], rid: str) -> dict[str, Any]:
        types = {"numeric": "FP64", "boolean": "BOOL", "categorical": "BYTES"}
        inputs = []
        for f in self.features:
            data = [r.get(f["name"]) for r in recs]
            inputs.append({"name": f["name"], "shape": [len(recs)], "datatype": types[f["kind"]]})
            inputs[-1]["data"] = data
        return {"id": rid, "inputs": inputs}


def dump(x: Any) -> bytes:
    return x if isinstance(x, bytes) else json.dumps(x).encode()


def records(rs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"records": rs}


def v1(edit: Edit = records, n: int = 1, count: int = 20, path: str = "/v1/score") -> Make:
    """``count`` native requests of ``n`` demo records, each changed by ``edit``."""
    return lambda b: [(path, dump(edit(b.some(n))), JSON) for _ in range(count)]


def v2(edit: Edit = lambda x: x, n: int = 1, count: int = 20, path: str = INFER) -> Make:
    """``count`` V2 requests of ``n`` demo records as tensors, each changed by ``edit``."""
    return lambda b: [
        (path, dump(edit(b.tensors(b.some(n), f"req-{j}"))), JSON) for j in range(count)
    ]


def both(*makes: Make) -> Make:
    return lambda b: [v for make in makes for v in make(b)]


def cut(make: Make) -> Make:
    """The first half of each body: JSON that ends in the middle."""
    return lambda b: [(p, (body or b"")[: len(body or b"") // 2], t) for p, body, t in make(b)]


def fixed(*bodies: bytes, path: str = "/v1/score", ctype: str = JSON) -> Make:
    return lambda b: [(path, body, ctype) for body in bodies]


def field(name: str, value: Any, i: int = 0) -> Edit:
    """Record ``i`` with ``name`` set to ``value``."""

    def edit(rs: list[dict[str, Any]]) -> dict[str, Any]:
        rs[i][name] = value
        return records(rs)

    return edit


def raw(name: str, token: bytes) -> Edit:
    """The first record's ``name`` written as ``token`` (not JSON: NaN, -Infinity)."""
    return lambda rs: dump(field(name, 1234567.125)(rs)).replace(b"1234567.125", token)


def without(name: str) -> Edit:
    def edit(rs: list[dict[str, Any]]) -> dict[str, Any]:
        del rs[0][name]
        return records(rs)

    return edit


def tensor(name: str, drop: bool = False, **change: Any) -> Edit:
    """A V2 body whose input ``name`` is changed (or left out: ``drop``)."""

    def edit(body: dict[str, Any]) -> dict[str, Any]:
        if drop:
            body["inputs"] = [t for t in body["inputs"] if t["name"] != name]
        for t in body["inputs"]:
            if t["name"] == name:
                t.update(change)
        return body

    return edit


def extra_input(body: dict[str, Any]) -> dict[str, Any]:
    colour = {"name": "colour", "shape": [1], "datatype": "BYTES", "data": ["red"]}
    return body | {"inputs": [*body["inputs"], colour]}


def too_large(b: Builder) -> list[Variant]:
    body = dump(records(b.recs * (MAX_BODY // len(dump(b.recs)) + 1)))
    return [("/v1/score", body, JSON)]


def big_v2(b: Builder) -> list[Variant]:
    recs = [b.recs[i % len(b.recs)] for i in range(MAX_RECORDS + 1)]
    return [(INFER, dump(b.tensors(recs, "big")), JSON)]


# ---------------------------------------------------------------- the kinds


@dataclass(eq=False, repr=False)  # its variants are large: never compare or print them
class Kind:
    name: str
    weight: float  # share of the traffic
    status: int  # the status it must get
    make: Make
    reason: str | None = None  # for a native 422: a reason its errors must list
    records: int = 0  # for a 200 score or infer: the results it must get
    method: str = "POST"
    accept: Callable[[Kind, httpx.Response], Verdict] | None = None  # else scored or refused

    def judge(self, r: httpx.Response) -> Verdict:
        return (self.accept or (scored if self.records else refused))(self, r)

    @property
    def group(self) -> str:
        return "get" if self.method == "GET" else "valid" if self.status == 200 else "invalid"


@dataclass(eq=False, repr=False)
class Built:
    kind: Kind
    variants: list[Variant]


def get(name: str, *paths: str, status: int = 200, accept: Any = any_answer, weight: float = 1,
        ) -> Kind:  # fmt: skip
    variants = [(p, None, None) for p in paths]
    return Kind(name, weight, status, lambda b: variants, method="GET", accept=accept)


Q = "/v1/score?"
FORM = "application/x-www-form-urlencoded"
ONE_BAD = field("tx_last_24h", [3], BATCH // 2)  # a list for a count, mid-batch
# name, share of the traffic, status it must get, its requests, (422 reason | records scored)
KINDS: list[Kind] = [
    Kind("v1 1 record", 30, 200, v1(count=200), records=1),
    Kind("v1 1 record, query", 3, 200, both(v1(path=Q + "score=recon&explain=0"),
                                            v1(path=Q + "score=iwae&explain=9")), records=1),
    Kind(f"v1 {BATCH} records", 7, 200, v1(n=BATCH, count=40), records=BATCH),
    Kind("v2 1 record", 12, 200, v2(count=200), records=1),
    Kind(f"v2 {BATCH} records", 4, 200, v2(n=BATCH, count=40), records=BATCH),
    Kind("v1 bad JSON", 2, 400, both(cut(v1(count=3)), fixed(b"not json at all", b""))),
    Kind("v1 wrong type", 2, 422, v1(field("amount", "12,5")), "wrong_type"),  # "12.5" is a number
    Kind("v1 text for boolean", 1, 422, v1(field("card_present", "perhaps")), "wrong_type"),
    Kind("v1 unknown field", 2, 422, v1(field("colour", "red")), "unknown_field"),
    Kind("v1 unknown top-level field", 1, 422, v1(lambda r: records(r) | {"mode": "fast"}),
         "unknown_field"),
    Kind("v1 missing field", 2, 422, v1(without("amount")), "missing"),
    Kind("v1 object for number", 1, 422, v1(field("hour", {"h": 3})), "wrong_type"),  # null: ok
    Kind("v1 not finite", 1, 422, both(v1(raw("amount", b"NaN")), v1(raw("amount", b"-Infinity"))),
         "not_finite"),
    Kind("v1 too long", 1, 422, v1(field("merchant_category", "x" * 300)), "too_long"),
    Kind("v1 not an object", 1, 422, fixed(dump(records([1, "a", None]))), "not_an_object"),
    Kind(f"v1 {BATCH} records, one bad", 2, 422, v1(ONE_BAD, n=BATCH, count=10), "wrong_type"),
    Kind("v1 empty batch", 2, 422, fixed(b'{"records": []}'), "empty_batch"),
    Kind("v1 oversize batch", 1, 422, fixed(dump(records([{}] * (MAX_RECORDS + 1)))),
         "batch_too_large"),
    Kind("v1 not a records object", 1, 422, fixed(b"[1, 2]", b'{"records": {}}', b"null"),
         "wrong_type"),
    Kind("v1 form body", 1, 415, both(fixed(b"amount=42.5&hour=18", ctype=FORM),
                                      fixed(b"hello", ctype="text/plain"))),
    Kind("v1 bad query", 1, 422, both(*(v1(count=3, path=Q + q) for q in (
        "explain=abc", "explain=-1", "explain=5000", "score=bogus")))),
    Kind("v1 body over the limit", 0.2, 413, too_large),
    Kind("v2 bad JSON", 1, 400, cut(v2(count=2))),
    Kind("v2 wrong datatype", 1.5, 400, v2(tensor("amount", datatype="BYTES", data=["a lot"]))),
    Kind("v2 wrong value type", 1.5, 400, both(v2(tensor("hour", data=["noon"])),
                                               v2(tensor("card_present", data=[1])))),
    Kind("v2 unknown input", 1, 400, v2(extra_input)),
    Kind("v2 missing input", 1, 400, v2(tensor("amount", drop=True))),
    Kind("v2 shape mismatch", 1, 400, v2(tensor("hour", shape=[2]))),
    Kind("v2 empty", 1, 400, v2(n=0, count=1)),
    Kind("v2 oversize", 0.5, 400, big_v2),
    Kind("v2 not an object", 1, 400, fixed(b"[]", b'{"inputs": 3}', path=INFER)),
    Kind("v2 unknown model", 1, 404, v2(count=5, path="/v2/models/nope/infer")),
    get("GET /v1/model", "/v1/model", accept=model_info, weight=1.5),
    get("GET /metrics", "/metrics", accept=metrics_text),
    get("GET /readyz", "/readyz"),
    get("GET /v2/models/soak", f"/v2/models/{MODEL}", "/v2/health/ready"),
    get("GET /v1/score (405)", "/v1/score", status=405, weight=0.5),
    get("GET unknown path (404)", "/v1/nothing", status=404, weight=0.5),
]  # fmt: skip


def demo_records(n: int) -> list[dict[str, Any]]:
    """Valid records: normal payments with some anomalies (scored, flagged) mixed in."""
    from training.demo_data import generate_payments, make_anomalies

    normal = json.loads(generate_payments(n, seed=99).to_json(orient="records"))
    odd = json.loads(make_anomalies(max(n // 10, 5), seed=99).to_json(orient="records"))
    out = [{k: v for k, v in r.items() if k != "anomaly_kind"} for r in normal + odd]
    random.Random(0).shuffle(out)
    return out


def build(kinds: list[Kind], features: list[dict[str, Any]]) -> list[Built]:
    b = Builder(demo_records(5000), features)
    return [Built(k, k.make(b)) for k in kinds]
