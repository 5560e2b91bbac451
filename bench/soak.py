"""Soak test (a bench, not CI): steady mixed traffic for minutes, with two model promotions.

    python bench/soak.py [--minutes 10] [--rate 200] [--warmup 30] [--out bench/results/soak.md]

Builds a registry of three small demo-payment models (`vae-anomaly sample-data` + `vae-anomaly
train --registry`; the first serves at once), starts the real service (`vae-anomaly serve
--registry`, 1 worker, 127.0.0.1, a short poll interval) and sends it open-loop traffic at a fixed
rate from one asyncio httpx client: valid single records and 100-record batches through both
`/v1/score` and the KServe V2 `/v2/models/{name}/infer`, invalid requests of many kinds (bad JSON,
wrong types, unknown fields, empty and oversize batches, a body over the limit, a form body
(415), bad query parameters, an unknown model) and a few GETs (`/v1/model`, `/metrics`, ...).
Every request has an expected status (valid: 200; invalid: a specific 4xx, and for a 422 the
expected reason).

At 1/3 and 2/3 of the run, `vae-anomaly models promote VERSION --registry DIR` switches the
serving version; the responses' model version must follow (and never go back). The RSS of the
server's process tree is sampled every 10 s. Latencies are measured from each request's
scheduled send time (no coordinated omission). Pass: zero 5xx, zero lost responses (connection
errors, timeouts, no answer), zero unexpected statuses or malformed bodies, both promotions
observed. The summary goes to stdout and to `--out` (Markdown); the exit status is 1 on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

if importlib.util.find_spec("sniffio") is None:
    # httpcore retries this failed import on every request (~2 ms of CPU each here); a None
    # entry makes it fail at once
    sys.modules["sniffio"] = None  # type: ignore[assignment]

HERE = Path(__file__).resolve().parent
EXE = Path(sys.executable).parent / "vae-anomaly"
HOST = "127.0.0.1"
MODEL = "soak"
MAX_RECORDS = 1000  # the service's limit for this run (VAE_ANOMALY_MAX_RECORDS)
MAX_BODY = 1024 * 1024  # VAE_ANOMALY_MAX_BODY_BYTES
BATCH = 100  # records in a "batch" request
RSS_EVERY = 10.0  # seconds between RSS samples
PRINT_EVERY = 30.0
TIMEOUT = 10.0  # client timeout per request: no answer by then = lost
now = time.perf_counter  # one clock for everything (uvloop's loop.time() has 1 ms steps)


# ---------------------------------------------------------------- setup: registry and server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cli(*args: str) -> str:
    """Run `vae-anomaly ARGS`; its stdout (raise with its stderr on failure)."""
    r = subprocess.run([str(EXE), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"vae-anomaly {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r.stdout


def build_registry(work: Path, rows: int, epochs: int) -> tuple[Path, list[str]]:
    """A registry with three versions of one model (same features); the first serves."""
    reg = work / "registry"
    versions: list[str] = []
    for seed in (1, 2, 3):
        data = work / f"payments-{seed}.csv"
        cli("sample-data", "--out", str(data), "--rows", str(rows), "--seed", str(seed))
        before = set(p.name for p in (reg / "versions").glob("*")) if reg.exists() else set()
        t0 = time.perf_counter()
        cli(
            "train",
            str(data),
            "--registry",
            str(reg),
            "--epochs",
            str(epochs),
            "--seed",
            str(seed),
            "--exclude",
            "transaction_id",
            "--name",
            MODEL,
            "--quiet",
        )
        (new,) = set(p.name for p in (reg / "versions").glob("*")) - before
        versions.append(new)
        print(f"  trained version {new} ({time.perf_counter() - t0:.0f} s)", flush=True)
    serving = json.loads((reg / "pointer.json").read_text())["serving"]
    if serving != versions[0]:
        raise RuntimeError(f"expected {versions[0]} to serve, the pointer says {serving}")
    return reg, versions


def start_server(reg: Path, port: int, log: Path, poll: float) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "VAE_ANOMALY_POLL_INTERVAL": str(poll),
        "VAE_ANOMALY_MAX_RECORDS": str(MAX_RECORDS),
        "VAE_ANOMALY_MAX_BODY_BYTES": str(MAX_BODY),
    }
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [
                str(EXE),
                "serve",
                "--registry",
                str(reg),
                "--host",
                HOST,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise RuntimeError("the server did not get ready in 120 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cap_memory(extra_gb: float) -> None:
    """Cap this process's address space at its size now plus ``extra_gb``: a runaway client
    fails with MemoryError (and a traceback; the server is stopped) instead of starving a
    shared machine. The server, started before, is not affected."""
    status = Path("/proc/self/status").read_text()
    size = int(re.search(r"^VmSize:\s+(\d+)", status, re.M).group(1)) * 1024  # type: ignore[union-attr]
    cap = size + int(extra_gb * 2**30)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


# ---------------------------------------------------------------- server process facts


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = defaultdict(list)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


@dataclass
class Sample:
    t: float  # seconds since the measured run started (negative: warm-up)
    rss_mb: float
    threads: int
    fds: int
    cpu_s: float
    pids: int


def sample(root: int, t: float) -> Sample:
    rss_kb = threads = fds = 0
    cpu = 0.0
    pids = process_tree(root)
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        rss_kb += int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        threads += int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        cpu += (int(stat[11]) + int(stat[12])) / tick  # utime + stime
    return Sample(t, rss_kb / 1024, threads, fds, cpu, len(pids))


# ---------------------------------------------------------------- the traffic


@dataclass(eq=False, repr=False)  # its bodies are large: never compare or print them
class Kind:
    """One kind of request: variants of (path, body, content type), the expected answer."""

    name: str
    group: str  # valid | invalid | get
    method: str
    variants: list[tuple[str, bytes | None, str | None]]
    status: int
    weight: float
    reason: str | None = None  # for a /v1 422: a reason its "errors" must list
    records: int = 0  # for a 200 score/infer: results expected

    def __repr__(self) -> str:
        return f"Kind({self.name!r})"


def clean(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "anomaly_kind"} for r in records]


def load_records(n: int) -> list[dict[str, Any]]:
    """Valid records: normal payments with some anomalies (scored, flagged) mixed in."""
    from training.demo_data import generate_payments, make_anomalies

    normal = json.loads(generate_payments(n, seed=99).to_json(orient="records"))
    odd = json.loads(make_anomalies(max(n // 10, 5), seed=99).to_json(orient="records"))
    out = clean(normal + odd)
    random.Random(0).shuffle(out)
    return out


def v2_body(recs: list[dict[str, Any]], features: list[dict[str, Any]], rid: str) -> dict[str, Any]:
    inputs = []
    for f in features:
        dtype = {"numeric": "FP64", "boolean": "BOOL", "categorical": "BYTES"}[f["kind"]]
        inputs.append(
            {
                "name": f["name"],
                "shape": [len(recs)],
                "datatype": dtype,
                "data": [r.get(f["name"]) for r in recs],
            }
        )
    return {"id": rid, "inputs": inputs}


def kinds(recs: list[dict[str, Any]], features: list[dict[str, Any]]) -> list[Kind]:
    rng = random.Random(1)
    js = "application/json"
    infer = f"/v2/models/{MODEL}/infer"

    def dump(x: Any) -> bytes:
        return json.dumps(x).encode()

    def some(k: int) -> list[dict[str, Any]]:
        i = rng.randrange(len(recs) - k)
        return [dict(r) for r in recs[i : i + k]]

    def v1(fn: Any, n: int = 1, count: int = 20, path: str = "/v1/score") -> list[Any]:
        out = []
        for _ in range(count):
            rs = some(n)
            body = fn(rs)
            out.append((path, body if isinstance(body, bytes) else dump(body), js))
        return out

    def v2(fn: Any, n: int = 1, count: int = 20, path: str = infer) -> list[Any]:
        out = []
        for j in range(count):
            body = fn(v2_body(some(n), features, f"req-{j}"))
            out.append((path, body if isinstance(body, bytes) else dump(body), js))
        return out

    def setf(rs: list[dict[str, Any]], i: int, k: str, v: Any) -> dict[str, Any]:
        rs[i][k] = v
        return {"records": rs}

    def drop(rs: list[dict[str, Any]], k: str) -> dict[str, Any]:
        del rs[0][k]
        return {"records": rs}

    def tensor(b: dict[str, Any], name: str, **kw: Any) -> dict[str, Any]:
        for t in b["inputs"]:
            if t["name"] == name:
                t.update(kw)
        return b

    def without(b: dict[str, Any], name: str) -> dict[str, Any]:
        b["inputs"] = [t for t in b["inputs"] if t["name"] != name]
        return b

    big_v2 = v2_body([recs[i % len(recs)] for i in range(MAX_RECORDS + 1)], features, "big")
    too_large = dump({"records": recs * (MAX_BODY // len(dump(recs)) + 1)})
    assert len(too_large) > MAX_BODY
    q = "/v1/score?"
    return [
        # valid
        Kind(
            "v1 1 record", "valid", "POST", v1(lambda r: {"records": r}, 1, 200), 200, 30, None, 1
        ),
        Kind(
            "v1 1 record, query",
            "valid",
            "POST",
            v1(lambda r: {"records": r}, 1, 20, q + "score=recon&explain=0")
            + v1(lambda r: {"records": r}, 1, 20, q + "score=iwae&explain=9"),
            200,
            3,
            None,
            1,
        ),
        Kind(
            f"v1 {BATCH} records",
            "valid",
            "POST",
            v1(lambda r: {"records": r}, BATCH, 40),
            200,
            7,
            None,
            BATCH,
        ),
        Kind("v2 1 record", "valid", "POST", v2(lambda b: b, 1, 200), 200, 12, None, 1),
        Kind(
            f"v2 {BATCH} records", "valid", "POST", v2(lambda b: b, BATCH, 40), 200, 4, None, BATCH
        ),
        # invalid /v1
        Kind(
            "v1 bad JSON",
            "invalid",
            "POST",
            [(p, b[: len(b) // 2], t) for p, b, t in v1(lambda r: {"records": r}, 3)]
            + [("/v1/score", b"not json at all", js), ("/v1/score", b"", js)],
            400,
            2,
        ),
        Kind(
            "v1 wrong type",
            "invalid",
            "POST",
            v1(lambda r: setf(r, 0, "amount", "12,5")),  # (text "12.5" is a number)
            422,
            2,
            "wrong_type",
        ),
        Kind(
            "v1 text for boolean",
            "invalid",
            "POST",
            v1(lambda r: setf(r, 0, "card_present", "perhaps")),  # ("yes" is true)
            422,
            1,
            "wrong_type",
        ),
        Kind(
            "v1 unknown field",
            "invalid",
            "POST",
            v1(lambda r: setf(r, 0, "colour", "red")),
            422,
            2,
            "unknown_field",
        ),
        Kind(
            "v1 unknown top-level field",
            "invalid",
            "POST",
            v1(lambda r: {"records": r, "mode": "fast"}),
            422,
            1,
            "unknown_field",
        ),
        Kind(
            "v1 missing field",
            "invalid",
            "POST",
            v1(lambda r: drop(r, "amount")),
            422,
            2,
            "missing",
        ),
        Kind(
            "v1 object for number",  # (a null is scored and named unusual)
            "invalid",
            "POST",
            v1(lambda r: setf(r, 0, "hour", {"h": 3})),
            422,
            1,
            "wrong_type",
        ),
        Kind(
            "v1 not finite",
            "invalid",
            "POST",
            v1(lambda r: dump(setf(r, 0, "amount", 1234567.125)).replace(b"1234567.125", b"NaN"))
            + v1(
                lambda r: dump(setf(r, 0, "amount", 1234567.125)).replace(
                    b"1234567.125", b"-Infinity"
                )
            ),
            422,
            1,
            "not_finite",
        ),
        Kind(
            "v1 too long",
            "invalid",
            "POST",
            v1(lambda r: setf(r, 0, "merchant_category", "x" * 300)),
            422,
            1,
            "too_long",
        ),
        Kind(
            "v1 not an object",
            "invalid",
            "POST",
            [("/v1/score", dump({"records": [1, "a", None]}), js)],
            422,
            1,
            "not_an_object",
        ),
        Kind(
            f"v1 {BATCH} records, one bad",
            "invalid",
            "POST",
            v1(lambda r: setf(r, BATCH // 2, "tx_last_24h", [3]), BATCH, 10),
            422,
            2,
            "wrong_type",
        ),
        Kind(
            "v1 empty batch",
            "invalid",
            "POST",
            [("/v1/score", dump({"records": []}), js)],
            422,
            2,
            "empty_batch",
        ),
        Kind(
            "v1 oversize batch",
            "invalid",
            "POST",
            [("/v1/score", dump({"records": [{}] * (MAX_RECORDS + 1)}), js)],
            422,
            1,
            "batch_too_large",
        ),
        Kind(
            "v1 not a records object",
            "invalid",
            "POST",
            [
                ("/v1/score", b"[1, 2]", js),
                ("/v1/score", b'{"records": {}}', js),
                ("/v1/score", b"null", js),
            ],
            422,
            1,
            "wrong_type",
        ),
        Kind(
            "v1 form body",
            "invalid",
            "POST",
            [
                ("/v1/score", b"amount=42.5&hour=18", "application/x-www-form-urlencoded"),
                ("/v1/score", b"hello", "text/plain"),
            ],
            415,
            1,
        ),
        Kind(
            "v1 bad query",
            "invalid",
            "POST",
            [
                (p, b, t)
                for query in ("explain=abc", "explain=-1", "explain=5000", "score=bogus")
                for p, b, t in v1(lambda r: {"records": r}, 1, 3, q + query)
            ],
            422,
            1,
        ),
        Kind("v1 body over the limit", "invalid", "POST", [("/v1/score", too_large, js)], 413, 0.2),
        # invalid /v2
        Kind(
            "v2 bad JSON",
            "invalid",
            "POST",
            [(p, b[: len(b) // 2], t) for p, b, t in v2(lambda b: b, 2)],
            400,
            1,
        ),
        Kind(
            "v2 wrong datatype",
            "invalid",
            "POST",
            v2(lambda b: tensor(b, "amount", datatype="BYTES", data=["a lot"])),
            400,
            1.5,
        ),
        Kind(
            "v2 wrong value type",
            "invalid",
            "POST",
            v2(lambda b: tensor(b, "hour", data=["noon"]))
            + v2(lambda b: tensor(b, "card_present", data=[1])),
            400,
            1.5,
        ),
        Kind(
            "v2 unknown input",
            "invalid",
            "POST",
            v2(
                lambda b: (
                    b
                    | {
                        "inputs": [
                            *b["inputs"],
                            {"name": "colour", "shape": [1], "datatype": "BYTES", "data": ["red"]},
                        ]
                    }
                )
            ),
            400,
            1,
        ),
        Kind("v2 missing input", "invalid", "POST", v2(lambda b: without(b, "amount")), 400, 1),
        Kind(
            "v2 shape mismatch",
            "invalid",
            "POST",
            v2(lambda b: tensor(b, "hour", shape=[2])),
            400,
            1,
        ),
        Kind("v2 empty", "invalid", "POST", v2(lambda b: b, 0, 1), 400, 1),
        Kind("v2 oversize", "invalid", "POST", [(infer, dump(big_v2), js)], 400, 0.5),
        Kind(
            "v2 not an object",
            "invalid",
            "POST",
            [(infer, b"[]", js), (infer, b'{"inputs": 3}', js)],
            400,
            1,
        ),
        Kind(
            "v2 unknown model",
            "invalid",
            "POST",
            v2(lambda b: b, 1, 5, "/v2/models/nope/infer"),
            404,
            1,
        ),
        # GETs
        Kind("GET /v1/model", "get", "GET", [("/v1/model", None, None)], 200, 1.5),
        Kind("GET /metrics", "get", "GET", [("/metrics", None, None)], 200, 1),
        Kind("GET /readyz", "get", "GET", [("/readyz", None, None)], 200, 1),
        Kind(
            "GET /v2/models/soak",
            "get",
            "GET",
            [(f"/v2/models/{MODEL}", None, None), ("/v2/health/ready", None, None)],
            200,
            1,
        ),
        Kind("GET /v1/score (405)", "get", "GET", [("/v1/score", None, None)], 405, 0.5),
        Kind("GET unknown path (404)", "get", "GET", [("/v1/nothing", None, None)], 404, 0.5),
    ]


@dataclass(eq=False)
class Result:
    kind: Kind
    due: float  # scheduled send time (perf_counter)
    sent: float
    done: float
    status: int | None  # None: lost
    error: str | None = None  # lost: the exception; else a malformed answer, if any
    version: str | None = None


@dataclass(eq=False, repr=False)
class Run:
    results: list[Result] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    promotions: list[dict[str, Any]] = field(default_factory=list)
    in_flight_max: int = 0
    start: float = 0.0  # perf_counter at the start of the measured run
    start_wall: float = 0.0
    end: float = 0.0


def check(kind: Kind, r: httpx.Response, rid: str) -> tuple[str | None, str | None]:
    """(what is wrong with this answer or None, the model version it names)."""
    if r.headers.get("x-request-id") != rid:
        return f"x-request-id {r.headers.get('x-request-id')!r}, sent {rid!r}", None
    if r.status_code != kind.status:
        return None, None  # counted as an unexpected status
    if kind.name == "GET /metrics":
        return (None if b"vae_anomaly_http_requests_total" in r.content else "no metrics"), None
    if kind.group == "get" and kind.name != "GET /v1/model":
        return None, None
    try:
        body = r.json()
    except ValueError:
        return f"not JSON: {r.content[:120]!r}", None
    if not isinstance(body, dict):
        return f"not a JSON object: {r.content[:120]!r}", None
    if kind.status == 200 and kind.records:
        if "results" in body:  # /v1
            if len(body["results"]) != kind.records:
                return f"{len(body['results'])} results for {kind.records} records", None
            return None, body["model"]["version"]
        out = body.get("outputs") or [{}]
        if out[0].get("shape") != [kind.records] or not body.get("id", "").startswith("req-"):
            return f"bad V2 answer {str(body)[:200]}", None
        return None, body["model_version"]
    if kind.name == "GET /v1/model":
        return None, body.get("version")
    if kind.status >= 400 and kind.group == "invalid" and "error" not in body:
        return f"no 'error' in {str(body)[:200]}", None
    if kind.reason is not None:
        reasons = {e.get("reason") for e in body.get("errors", [])}
        if kind.reason not in reasons:
            return f"reasons {sorted(map(str, reasons))}, expected {kind.reason}", None
    return None, None


async def one(
    client: httpx.AsyncClient, pool: asyncio.Semaphore, run: Run, kind: Kind, i: int, due: float
) -> None:
    """Send one request (when one of the pool's connections is free) and check the answer."""
    path, body, ctype = kind.variants[i % len(kind.variants)]
    rid = f"soak-{i}"
    headers = {"x-request-id": rid}
    if ctype:
        headers["content-type"] = ctype
    sent = float("nan")
    try:
        async with pool:  # never more requests than connections: httpx's pool never queues
            sent = now()
            r = await client.request(kind.method, path, content=body, headers=headers)
    except httpx.HTTPError as e:
        run.results.append(Result(kind, due, sent, now(), None, f"{type(e).__name__}: {e}"))
        return
    except asyncio.CancelledError:
        run.results.append(Result(kind, due, sent, now(), None, "no answer by the end"))
        raise
    done = now()
    bad, version = check(kind, r, rid)
    res = Result(kind, due, sent, done, r.status_code, bad, version)
    if r.status_code != kind.status or bad:
        res.error = (bad or "") + f" | body {r.content[:300]!r}"
    run.results.append(res)


async def sampler(run: Run, pid: int, stop_at: asyncio.Event) -> None:
    """Every RSS_EVERY seconds on a grid through the start of the measured part (t = 0)."""
    k = int(np.ceil((now() - run.start) / RSS_EVERY))
    while True:
        tick = run.start + k * RSS_EVERY
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_at.wait(), max(0.0, tick - now()))
        if stop_at.is_set():
            return
        run.samples.append(sample(pid, now() - run.start))
        k += 1


async def promote(run: Run, reg: Path, version: str, at: float) -> None:
    await asyncio.sleep(max(0.0, at - now()))
    began = now()
    p = await asyncio.create_subprocess_exec(
        str(EXE),
        "models",
        "promote",
        version,
        "--registry",
        str(reg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await p.communicate()
    run.promotions.append(
        {
            "version": version,
            "began": began,
            "done": now(),
            "wall": run.start_wall + (began - run.start),
            "rc": p.returncode,
            "output": out.decode().strip(),
        }
    )
    print(
        f"  promoted {version} at t={began - run.start:.1f} s: {out.decode().strip()}", flush=True
    )


async def drive(
    a: argparse.Namespace, port: int, pid: int, reg: Path, versions: list[str], ks: list[Kind]
) -> Run:
    run = Run()
    rng = random.Random(a.seed)
    weights = [k.weight for k in ks]
    counter = Counter[str]()
    limits = httpx.Limits(max_connections=a.connections, max_keepalive_connections=a.connections)
    tasks: set[asyncio.Task[None]] = set()
    pool = asyncio.Semaphore(a.connections)
    duration = a.minutes * 60
    t_begin = now()
    run.start = t_begin + a.warmup
    run.start_wall = time.time() + a.warmup
    run.end = run.start + duration
    stop_sampling = asyncio.Event()
    side = [
        asyncio.create_task(sampler(run, pid, stop_sampling)),
        asyncio.create_task(promote(run, reg, versions[1], run.start + duration / 3)),
        asyncio.create_task(promote(run, reg, versions[2], run.start + 2 * duration / 3)),
    ]
    last_print = t_begin
    async with httpx.AsyncClient(
        base_url=f"http://{HOST}:{port}", limits=limits, timeout=TIMEOUT
    ) as client:
        i = 0
        while True:
            due = t_begin + i / a.rate
            if due >= run.end:
                break
            wait = due - now()
            if wait > 0:
                await asyncio.sleep(wait)
            kind = rng.choices(ks, weights)[0]
            counter[kind.name] += 1
            task = asyncio.create_task(one(client, pool, run, kind, counter[kind.name], due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            run.in_flight_max = max(run.in_flight_max, len(tasks))
            i += 1
            if now() - last_print >= PRINT_EVERY:
                last_print = now()
                t = now() - run.start
                bad = sum(
                    1
                    for r in run.results
                    if r.status is None or r.status >= 500 or r.status != r.kind.status or r.error
                )
                print(
                    f"  t={t:6.0f} s  sent {i}  answered {len(run.results)}  in flight "
                    f"{len(tasks)}  problems {bad}  RSS "
                    f"{run.samples[-1].rss_mb if run.samples else float('nan'):.1f} MB  (client "
                    f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB peak)",
                    flush=True,
                )
        if tasks:
            await asyncio.wait(tasks, timeout=TIMEOUT + 5)
        left = list(tasks)
        for task in left:  # never answered (should not happen: the client times out)
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
    assert len(run.results) == i, (len(run.results), i)
    if not run.samples or now() - run.start - run.samples[-1].t > 1:
        run.samples.append(sample(pid, now() - run.start))  # RSS at the end
    stop_sampling.set()
    await asyncio.gather(*side)
    return run


# ---------------------------------------------------------------- report


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def scrape_metrics(port: int) -> dict[str, float]:
    """Server-side counts: POST answers by status class, 5xx, reloads."""
    text = httpx.get(f"http://{HOST}:{port}/metrics", timeout=10).text
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = re.match(r"vae_anomaly_http_requests_total\{(.*)\} ([\d.e+]+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[f"{labels['method']} {labels['status'][0]}xx"] += float(m.group(2))
            out[labels["method"]] += float(m.group(2))
            out[f"{labels['status'][0]}xx"] += float(m.group(2))
        m = re.match(r'vae_anomaly_model_reloads_total\{result="(\w+)"\} ([\d.e+]+)', line)
        if m:
            out[f"reloads {m.group(1)}"] = float(m.group(2))
    return out


def log_summary(log: Path) -> str:
    """The server's warnings and errors (JSON lines): counts by message and exception, and the
    last few, each with the last line of its traceback."""
    events: Counter[str] = Counter()
    last: list[str] = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            exc = (e.get("exc") or "").strip().splitlines()
            what = f"{e.get('level')} {e.get('msg', '').strip()}" + (f" [{exc[-1]}]" if exc else "")
            when = f"{e.get('ts')} {e.get('request_id') or ''} "
        except ValueError:
            what, when = line[:200], ""
        events[what] += 1
        last.append(when + what)
    if not events:
        return ""
    counts = [f"{n:>6}  {what}" for what, n in events.most_common()]
    return "\n".join(["count by message:", *counts, "last:", *last[-8:]])


def analyse(
    a: argparse.Namespace, run: Run, versions: list[str], server: dict[str, float], log_tail: str
) -> tuple[list[str], bool]:
    lines: list[str] = []
    rs = run.results
    lost = [r for r in run.results if r.status is None]
    fives = [r for r in rs if r.status is not None and r.status >= 500]
    unexpected = [r for r in rs if r.status is not None and r.status != r.kind.status]
    malformed = [r for r in rs if r.status == r.kind.status and r.error]
    measured = [r for r in rs if r.due >= run.start]
    dur = run.end - run.start

    def lat(xs: list[Result]) -> list[float]:  # from the scheduled send time (open loop)
        return [(r.done - r.due) * 1000 for r in xs if r.status is not None]

    def svc(xs: list[Result]) -> list[float]:  # from the actual send (the server's share)
        return [(r.done - r.sent) * 1000 for r in xs if r.status is not None]

    def lag(xs: list[Result]) -> list[float]:  # the client late to send (its own saturation)
        return [(r.sent - r.due) * 1000 for r in xs if r.sent == r.sent]

    # promotions: the first answer naming the new version; none naming an older one after it
    order = {v: i for i, v in enumerate(versions)}
    seen = sorted((r.done, r.sent, r.version) for r in rs if r.version)
    promo_ok = len(run.promotions) == 2
    promo_rows = []
    ss = sorted(run.samples, key=lambda s: s.t)
    for p in sorted(run.promotions, key=lambda p: p["began"]):
        first = next((d for d, _, v in seen if v == p["version"]), None)
        stale = sum(
            1
            for _, s, v in seen
            if first is not None and s > first and order[v] < order[p["version"]]
        )
        before = sum(1 for d, _, v in seen if v == p["version"] and d < p["began"])
        ok = p["rc"] == 0 and first is not None and stale == 0 and before == 0
        promo_ok &= ok
        window = [r for r in rs if p["began"] - 1 <= r.due <= (first or p["done"]) + 5]
        win_bad = sum(1 for r in window if r.status is None or r.status != r.kind.status or r.error)
        tp = p["began"] - run.start
        rss_before = next((s.rss_mb for s in reversed(ss) if s.t <= tp), float("nan"))
        rss_after = next((s.rss_mb for s in ss if s.t >= tp + 60), ss[-1].rss_mb)
        promo_rows.append(
            f"| {p['version']} | {dt.datetime.fromtimestamp(p['wall'], dt.UTC):%H:%M:%S} UTC "
            f"(t={p['began'] - run.start:.1f} s) | {p['rc']} | "
            + (
                f"t={first - run.start:.2f} s ({first - p['done']:.2f} s after)"
                if first
                else "never"
            )
            + f" | {stale} | {len(window)} / {win_bad} | {rss_before:.1f} → {rss_after:.1f} | "
            f"{'yes' if ok else 'NO'} |"
        )
    spans = []
    for v in versions:
        ts = [d - run.start for d, _, w in seen if w == v]
        if ts:
            spans.append(f"{v} t={min(ts):.1f}..{max(ts):.1f} s")

    # memory
    start_s = min((s for s in ss if s.t >= -0.5), key=lambda s: abs(s.t), default=ss[0])
    end_s = ss[-1]
    second = [s for s in ss if s.t >= dur / 2]
    slope = (
        float(np.polyfit([s.t / 60 for s in second], [s.rss_mb for s in second], 1)[0])
        if len(second) >= 3
        else float("nan")
    )
    last = max((p["began"] - run.start for p in run.promotions), default=0.0) + 60
    settled = [s for s in ss if s.t >= last]
    slope_settled = (
        float(np.polyfit([s.t / 60 for s in settled], [s.rss_mb for s in settled], 1)[0])
        if len(settled) >= 3
        else float("nan")
    )
    slope_all = float(
        np.polyfit([s.t / 60 for s in ss if s.t >= 0], [s.rss_mb for s in ss if s.t >= 0], 1)[0]
    )
    cpu = (end_s.cpu_s - start_s.cpu_s) / max(end_s.t - start_s.t, 1e-9)

    server_5xx = server.get("5xx", 0)
    passed = (
        not lost and not fives and not unexpected and not malformed and promo_ok and not server_5xx
    )
    if a.max_rss_slope is not None and not slope <= a.max_rss_slope:
        passed = False
    by_group = Counter(r.kind.group for r in rs)
    lines += [
        "| measure | result |",
        "|---|---|",
        f"| verdict | **{'PASS' if passed else 'FAIL'}** |",
        f"| duration (measured) / warm-up | {dur / 60:.1f} min / {a.warmup:.0f} s |",
        f"| rate asked / sent / answered (measured part) | {a.rate:.0f} / "
        f"{sum(1 for r in rs if run.start <= r.sent < run.end) / dur:.1f} / "
        f"{sum(1 for r in rs if r.status and run.start <= r.done < run.end) / dur:.1f} req/s |",
        f"| requests sent (incl. warm-up) | {len(run.results):,}: valid {by_group['valid']:,}, "
        f"invalid {by_group['invalid']:,}, GET {by_group['get']:,} |",
        f"| 5xx | {len(fives)} |",
        f"| lost responses (connection error, timeout, no answer) | {len(lost)} |",
        f"| unexpected status | {len(unexpected)} |",
        f"| malformed answer (wrong count, request id, reason, version field) | {len(malformed)} |",
        f"| promotions observed | {sum(1 for r in promo_rows if r.endswith('yes |'))} of 2; "
        f"answers named {'; '.join(spans)} |",
        f"| server RSS start / end / max | {start_s.rss_mb:.1f} / {end_s.rss_mb:.1f} / "
        f"{max(s.rss_mb for s in ss if s.t >= 0):.1f} MB |",
        f"| RSS slope, second half (linear fit) | {slope:+.3f} MB/min "
        f"(whole measured run {slope_all:+.3f} MB/min) |",
        f"| RSS slope from 60 s after the last promotion to the end | {slope_settled:+.3f} MB/min "
        f"({len(settled)} samples) |",
        f"| server threads / open fds / processes, start → end | {start_s.threads} → "
        f"{end_s.threads} / {start_s.fds} → {end_s.fds} / {start_s.pids} → {end_s.pids} |",
        f"| server CPU (measured part) | {cpu:.0%} of one core |",
        f"| latency p50 / p99 / max, all (from the scheduled time) | "
        f"{pct(lat(measured), 50):.1f} / {pct(lat(measured), 99):.1f} / "
        f"{max(lat(measured), default=float('nan')):.1f} ms |",
        f"| service time p50 / p99 / max, all (from the actual send) | "
        f"{pct(svc(measured), 50):.1f} / {pct(svc(measured), 99):.1f} / "
        f"{max(svc(measured), default=float('nan')):.1f} ms |",
        f"| client send lag p99 / max (client saturation) | {pct(lag(measured), 99):.1f} / "
        f"{max(lag(measured), default=float('nan')):.1f} ms |",
        f"| latency p50 / p99, valid 1 record | "
        f"{pct(lat([r for r in measured if r.kind.records == 1]), 50):.1f} / "
        f"{pct(lat([r for r in measured if r.kind.records == 1]), 99):.1f} ms |",
        f"| latency p50 / p99, valid {BATCH} records | "
        f"{pct(lat([r for r in measured if r.kind.records == BATCH]), 50):.1f} / "
        f"{pct(lat([r for r in measured if r.kind.records == BATCH]), 99):.1f} ms |",
        f"| client in flight, max | {run.in_flight_max} (pool of {a.connections}) |",
        f"| server's own count (/metrics): POSTs answered / 5xx (any method) | "
        f"{server.get('POST', 0):,.0f} (client got "
        f"{sum(1 for r in rs if r.kind.method == 'POST' and r.status):,}) / {server_5xx:.0f} |",
        f"| server model reloads: success / failure | {server.get('reloads success', 0):.0f} / "
        f"{server.get('reloads failure', 0):.0f} |",
        "",
        "Promotions (`vae-anomaly models promote VERSION --registry DIR`):",
        "",
        "| version | promoted at | exit | first answer naming it | answers naming an older "
        "version, sent after that | requests around it / failed | server RSS MB before → 60 s "
        "after | observed |",
        "|---|---|---|---|---|---|---|---|",
        *promo_rows,
        "",
        "Per minute (measured part; latency from the scheduled send time):",
        "",
        "| minute | requests | req/s | p50 ms | p99 ms | valid p50 ms | valid p99 ms "
        "| service p99 ms | client lag max ms | problems | RSS MB at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in range(int(np.ceil(dur / 60 - 1e-6))):
        lo, hi = run.start + 60 * m, min(run.start + 60 * (m + 1), run.end)
        part = [r for r in measured if lo <= r.due < hi]
        valid = [r for r in part if r.kind.group == "valid"]
        probs = sum(1 for r in part if r.status is None or r.status != r.kind.status or r.error)
        rss = [s.rss_mb for s in ss if s.t <= hi - run.start]
        lines.append(
            f"| {m + 1} | {len(part):,} | {len(part) / max(hi - lo, 1e-9):.1f} | "
            f"{pct(lat(part), 50):.1f} | {pct(lat(part), 99):.1f} | {pct(lat(valid), 50):.1f} | "
            f"{pct(lat(valid), 99):.1f} | {pct(svc(part), 99):.1f} | "
            f"{max(lag(part), default=float('nan')):.1f} | {probs} | "
            f"{rss[-1] if rss else float('nan'):.1f} |"
        )
    lines += [
        "",
        "RSS samples (server process tree, every 10 s; t from the start of the measured part):",
        "",
        "```",
        "  ".join(f"{s.t:.0f}s:{s.rss_mb:.1f}" for s in ss),
        "```",
        "",
        "Requests by kind (expected status; sent; answers by status; service time from the "
        "actual send, whole run):",
        "",
        "| kind | expected | sent | answers | service p50 ms | service p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    per_kind: dict[str, Counter[str]] = defaultdict(Counter)
    of_kind: dict[str, list[Result]] = defaultdict(list)
    for r in rs:
        per_kind[r.kind.name][str(r.status) if r.status else "lost"] += 1
        of_kind[r.kind.name].append(r)
    for k in {r.kind.name: r.kind for r in rs}.values():
        c = per_kind[k.name]
        lines.append(
            f"| {k.name} | {k.status}{' ' + k.reason if k.reason else ''} | "
            f"{sum(c.values()):,} | {', '.join(f'{s}: {n:,}' for s, n in sorted(c.items()))} | "
            f"{pct(svc(of_kind[k.name]), 50):.1f} | {pct(svc(of_kind[k.name]), 99):.1f} |"
        )
    problems = lost + fives + unexpected + malformed
    if problems:
        lines += ["", "First problems (kind, expected, got, detail):", ""]
        shown: Counter[str] = Counter()
        for r in sorted(problems, key=lambda r: r.due):
            key = f"{r.kind.name} {r.status}"
            shown[key] += 1
            if shown[key] <= 3:
                lines.append(
                    f"- t={r.due - run.start:.1f} s {r.kind.name}: expected {r.kind.status}, got "
                    f"{r.status or 'no answer'}: {str(r.error)[:400]}"
                )
        lines += ["", "Problem counts: " + ", ".join(f"{k}: {n}" for k, n in shown.items())]
    if log_tail.strip():
        lines += ["", "Server log (warnings and errors; last lines):", "", "```", log_tail, "```"]
    return lines, passed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="measured duration")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second (open loop)")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of traffic before")
    p.add_argument("--connections", type=int, default=16, help="client connection pool")
    p.add_argument("--poll", type=float, default=0.5, help="VAE_ANOMALY_POLL_INTERVAL")
    p.add_argument("--rows", type=int, default=3000, help="training records per version")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="of the request mix")
    p.add_argument("--max-rss-slope", type=float, help="fail above this MB/min (off by default)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "soak.md")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--client-memory-gb",
        type=float,
        default=4.0,
        help="address space this client may add once the server runs (a guard)",
    )
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vae-soak-"))
    load0 = os.getloadavg()
    date = dt.datetime.now(dt.UTC)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; work dir {work}",
        flush=True,
    )
    passed = False
    proc: subprocess.Popen[bytes] | None = None
    try:
        print("building the registry (3 versions)", flush=True)
        reg, versions = build_registry(work, a.rows, a.epochs)
        manifest = json.loads((reg / "versions" / versions[0] / "manifest.json").read_text())
        recs = load_records(5000)
        ks = kinds(recs, manifest["features"])
        port = free_port()
        log = work / "server.log"
        proc = start_server(reg, port, log, a.poll)
        print(
            f"serving {versions[0]} on {HOST}:{port} (pid {proc.pid}); {a.warmup:.0f} s warm-up, "
            f"then {a.minutes:g} min at {a.rate:g} req/s; promotions at 1/3 and 2/3",
            flush=True,
        )
        cap_memory(a.client_memory_gb)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        coro = drive(a, port, proc.pid, reg, versions, ks)
        if importlib.util.find_spec("uvloop"):  # the client's own overhead matters here
            import uvloop

            run = uvloop.run(coro)
        else:
            run = asyncio.run(coro)
        server = scrape_metrics(port) if proc.poll() is None else {}
        alive = proc.poll() is None
        stop(proc)
        tail = log_summary(log)
        lines, passed = analyse(a, run, versions, server, tail)
        if not alive:
            passed = False
            lines.insert(2, "| server process | **died during the run** |")
        cpu_model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        client = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
        wall = a.warmup + a.minutes * 60
        head = [
            "# Soak test",
            "",
            f"Command: `python bench/soak.py{' ' if sys.argv[1:] else ''}{' '.join(sys.argv[1:])}`",
            "",
            f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores (nproc), "
            f"{cpu_model}; Python {platform.python_version()}; {date:%Y-%m-%d %H:%M} UTC. "
            f"Load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f} (the machine "
            "is shared). The client (this process: one uvloop event loop, httpx) used "
            f"{client:.0f} s of CPU while sending ({client / wall:.0%} of one core), peak RSS "
            f"{cpu1.ru_maxrss / 1024:.0f} MB.",
            "",
            f"Setup: 3 versions of model `{MODEL}` ({a.rows} demo payments each, {a.epochs} "
            f"epochs, seeds 1-3) in a registry; `vae-anomaly serve --registry` with 1 worker, "
            f"VAE_ANOMALY_POLL_INTERVAL={a.poll:g}, MAX_RECORDS={MAX_RECORDS}, "
            f"MAX_BODY_BYTES={MAX_BODY}, log level warning. Open-loop traffic at a fixed rate, "
            f"{a.connections} connections at most, a {TIMEOUT:g} s client timeout; valid batches "
            f"hold {BATCH} records.",
            "",
        ]
        report = "\n".join(head + lines) + "\n"
        print()
        print(report)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(report)
        print(f"written to {a.out}")
    finally:
        if proc is not None:
            stop(proc)
        if a.keep or not passed:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
