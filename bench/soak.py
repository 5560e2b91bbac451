"""Soak test (a bench, not CI): steady mixed traffic for minutes, with two model promotions.

    python bench/soak.py [--minutes 10] [--rate 200] [--warmup 30] [--out bench/results/soak.md]

Builds a registry of three small demo-payment models (`vae-anomaly sample-data` + `train
--registry`; the first serves), starts the real service (`serve --registry`, 1 worker,
127.0.0.1, a short poll interval) and sends it open-loop traffic at a fixed rate from one
asyncio httpx client, drawn from the request kinds of bench/soak_kinds.py (valid records and
batches on `/v1` and V2, invalid requests of many kinds, GETs), each with the answer it must
get. At 1/3 and 2/3 of the run `vae-anomaly models promote` switches the serving version: the
answers' model version must follow and never go back. The RSS of the server's process tree is
sampled every 10 s; latencies count from each request's scheduled send time (no coordinated
omission). Pass: zero 5xx, zero lost responses, zero unexpected statuses or malformed answers,
both promotions seen. The summary goes to stdout and `--out` (Markdown); the exit status is 1
on failure.
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
from pathlib import Path

import httpx
import numpy as np
from soak_kinds import BATCH, KINDS, MAX_BODY, MAX_RECORDS, MODEL, Built, build
from soak_report import Result, Run, analyse, log_problems

if importlib.util.find_spec("sniffio") is None:
    # httpcore retries this failed import on every request (~2 ms of CPU each here); a None
    # entry makes it fail at once
    sys.modules["sniffio"] = None  # type: ignore[assignment]

HERE = Path(__file__).resolve().parent
EXE = Path(sys.executable).parent / "vae-anomaly"
HOST = "127.0.0.1"
RSS_EVERY = 10.0  # seconds between RSS samples
PRINT_EVERY = 30.0
TIMEOUT = 10.0  # client timeout per request: no answer by then = lost
now = time.perf_counter  # one clock for everything (uvloop's loop.time() has 1 ms steps)


# ---------------------------------------------------------------- setup: registry and server


def cli(*args: str) -> str:
    """Run `vae-anomaly ARGS`; its stdout (raise with its stderr on failure)."""
    r = subprocess.run([str(EXE), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"vae-anomaly {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r.stdout


def build_registry(work: Path, rows: int, epochs: int) -> tuple[Path, list[str]]:
    """A registry with three versions of one model (same features); the first serves."""
    reg, versions = work / "registry", []
    for seed in (1, 2, 3):
        data = work / f"payments-{seed}.csv"
        cli("sample-data", "--out", str(data), "--rows", str(rows), "--seed", str(seed))
        before = {p.name for p in (reg / "versions").glob("*")}
        args = ["--epochs", str(epochs), "--seed", str(seed), "--name", MODEL, "--quiet"]
        cli("train", str(data), "--registry", str(reg), "--exclude", "transaction_id", *args)
        (new,) = {p.name for p in (reg / "versions").glob("*")} - before
        versions.append(new)
        print(f"  trained version {new}", flush=True)
    return reg, versions


def start_server(reg: Path, port: int, log: Path, poll: float) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "VAE_ANOMALY_POLL_INTERVAL": str(poll),
        "VAE_ANOMALY_MAX_RECORDS": str(MAX_RECORDS),
        "VAE_ANOMALY_MAX_BODY_BYTES": str(MAX_BODY),
    }
    args = ["serve", "--registry", str(reg), "--host", HOST, "--port", str(port)]
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [str(EXE), *args, "--log-level", "warning"], env=env, stdout=f, stderr=f
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://{HOST}:{port}/readyz", timeout=2).status_code == 200:
                return proc
        time.sleep(0.2)
    stop(proc)
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
    fails with MemoryError instead of starving a shared machine (the server is not affected)."""
    status = Path("/proc/self/status").read_text()
    size = int(re.search(r"^VmSize:\s+(\d+)", status, re.M).group(1)) * 1024  # type: ignore[union-attr]
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + int(extra_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard < 0 else min(cap, hard), hard))


def tree_rss_mb(root: int) -> float:
    """RSS of ``root`` and all its descendants (the parser helper and its fork server too)."""
    children: dict[int, list[int]] = defaultdict(list)
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            children[int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])].append(int(d.name))
    kb, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        with contextlib.suppress(OSError, AttributeError):
            status = Path(f"/proc/{pid}/status").read_text()
            kb += int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    return kb / 1024


# ---------------------------------------------------------------- the run


async def one(
    client: httpx.AsyncClient, pool: asyncio.Semaphore, run: Run, b: Built, i: int, due: float
) -> None:
    """Send one request (when one of the pool's connections is free) and judge the answer."""
    kind = b.kind
    path, body, ctype = b.variants[i % len(b.variants)]
    rid = f"soak-{i}"
    headers = {"x-request-id": rid, **({"content-type": ctype} if ctype else {})}
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
    wrong, version = None, None
    if r.headers.get("x-request-id") != rid:
        wrong = f"x-request-id {r.headers.get('x-request-id')!r}, sent {rid!r}"
    elif r.status_code == kind.status:
        wrong, version = kind.judge(r)
    if wrong or r.status_code != kind.status:
        wrong = f"{wrong or ''} | body {r.content[:300]!r}"
    run.results.append(Result(kind, due, sent, now(), r.status_code, wrong, version))


async def sampler(run: Run, pid: int, stopped: asyncio.Event) -> None:
    """The server's RSS every RSS_EVERY seconds, on a grid through t = 0."""
    k = int(np.ceil((now() - run.start) / RSS_EVERY))
    while not stopped.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), max(0.0, run.start + k * RSS_EVERY - now()))
        run.rss.append((now() - run.start, tree_rss_mb(pid)))
        k += 1


async def promote(run: Run, reg: Path, version: str, at: float) -> None:
    await asyncio.sleep(max(0.0, at - now()))
    began = now()
    args = ["models", "promote", version, "--registry", str(reg)]
    pipe, stdout = asyncio.subprocess.PIPE, asyncio.subprocess.STDOUT
    p = await asyncio.create_subprocess_exec(str(EXE), *args, stdout=pipe, stderr=stdout)
    out = (await p.communicate())[0].decode().strip()
    run.promotions.append({"version": version, "began": began, "done": now(), "rc": p.returncode})
    print(f"  promoted {version} at t={began - run.start:.1f} s: {out}", flush=True)


async def drive(
    a: argparse.Namespace, port: int, pid: int, reg: Path, versions: list[str], kinds: list[Built]
) -> Run:
    """Open-loop traffic at ``a.rate`` for the warm-up and the measured minutes."""
    rng, sent = random.Random(a.seed), Counter[str]()
    t0 = now()
    run = Run(t0 + a.warmup, t0 + a.warmup + a.minutes * 60, time.time() + a.warmup)
    third = (run.end - run.start) / 3
    stopped, tasks = asyncio.Event(), set[asyncio.Task[None]]()
    side = [
        asyncio.create_task(sampler(run, pid, stopped)),
        asyncio.create_task(promote(run, reg, versions[1], run.start + third)),
        asyncio.create_task(promote(run, reg, versions[2], run.start + 2 * third)),
    ]
    pool, last_print = asyncio.Semaphore(a.connections), t0
    limits = httpx.Limits(max_connections=a.connections, max_keepalive_connections=a.connections)
    url = f"http://{HOST}:{port}"
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=TIMEOUT) as client:
        for i in range(int((run.end - t0) * a.rate)):
            await asyncio.sleep(max(0.0, t0 + i / a.rate - now()))
            b = rng.choices(kinds, [k.kind.weight for k in kinds])[0]
            sent[b.kind.name] += 1
            task = asyncio.create_task(
                one(client, pool, run, b, sent[b.kind.name], t0 + i / a.rate)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if now() - last_print >= PRINT_EVERY:
                last_print = now()
                bad = sum(r.bad for r in run.results)
                print(
                    f"  t={now() - run.start:6.0f} s  sent {i}  answered {len(run.results)}  "
                    f"in flight {len(tasks)}  problems {bad}",
                    flush=True,
                )
        if tasks:
            await asyncio.wait(tasks, timeout=TIMEOUT + 5)
        for task in list(tasks):  # never answered (should not happen: the client times out)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    stopped.set()
    await asyncio.gather(*side)
    return run


# ---------------------------------------------------------------- report


def server_counts(port: int) -> dict[str, float]:
    """The server's own count of 5xx answers and model reloads, from /metrics."""
    out: dict[str, float] = defaultdict(float)
    for line in httpx.get(f"http://{HOST}:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith("vae_anomaly_http_requests_total{") and 'status="5' in line:
            out["5xx"] += float(line.rsplit(" ", 1)[1])
        if m := re.match(r'vae_anomaly_model_reloads_total\{result="(\w+)"\} ([\d.e+]+)', line):
            out[f"reloads {m[1]}"] = float(m[2])
    return out


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
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
        help="address space the client may add once the server runs (a guard)",
    )
    return p.parse_args()


def soak(a: argparse.Namespace, work: Path) -> tuple[list[str], bool]:
    print("building the registry (3 versions)", flush=True)
    reg, versions = build_registry(work, a.rows, a.epochs)
    manifest = json.loads((reg / "versions" / versions[0] / "manifest.json").read_text())
    kinds = build(KINDS, manifest["features"])
    port, log = free_port(), work / "server.log"
    proc = start_server(reg, port, log, a.poll)
    try:
        print(
            f"serving {versions[0]} on {HOST}:{port}; {a.warmup:.0f} s warm-up, then "
            f"{a.minutes:g} min at {a.rate:g} req/s",
            flush=True,
        )
        cap_memory(a.client_memory_gb)
        coro = drive(a, port, proc.pid, reg, versions, kinds)
        if importlib.util.find_spec("uvloop"):  # the client's own overhead matters here
            import uvloop

            run = uvloop.run(coro)
        else:
            run = asyncio.run(coro)
        alive = proc.poll() is None
        server = server_counts(port) if alive else {}
    finally:
        stop(proc)
    lines, passed = analyse(a, run, versions, server, log_problems(log))
    if not alive:
        lines.insert(2, "| server process | **died during the run** |")
    return lines, passed and alive


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def main() -> int:
    a = parse_args()
    work = Path(tempfile.mkdtemp(prefix="vae-soak-"))
    load0, date = os.getloadavg()[0], dt.datetime.now(dt.UTC)
    passed = False
    try:
        lines, passed = soak(a, work)
        head = [
            "# Soak test",
            "",
            f"Command: `{' '.join(['python bench/soak.py', *sys.argv[1:]])}`",
            "",
            f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python "
            f"{platform.python_version()}; {date:%Y-%m-%d %H:%M} UTC; load average {load0:.2f} "
            f"at start, {os.getloadavg()[0]:.2f} at end. 3 versions of `{MODEL}` ({a.rows} "
            f"payments, {a.epochs} epochs); 1 worker; MAX_RECORDS={MAX_RECORDS}, MAX_BODY_BYTES="
            f"{MAX_BODY}; batches of {BATCH}; {a.connections} connections, {TIMEOUT:g} s timeout.",
            "",
        ]
        report = "\n".join(head + lines) + "\n"
        print("\n" + report)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(report)
        print(f"written to {a.out}")
    finally:
        if a.keep or not passed:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
