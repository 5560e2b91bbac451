"""A bounded gRPC load for the V2 ``ModelInfer`` call, driven by h2load (the C load generator
of nghttp2: ``apt-get install -y nghttp2-client``), so gRPC is loaded as cheaply as wrk loads
REST and the server under test keeps the cores.

    python bench/grpc_load.py HOST:PORT REQUEST.bin [-c 64] [-d 5] [--pid PID] [--metrics URL]

A unary gRPC call is an HTTP/2 POST: h2load sends the serialized ``ModelInferRequest`` in its
5-byte gRPC frame (no compression, 4-byte big-endian length) with ``content-type:
application/grpc`` and ``te: trailers``, ``c`` connections with one call in flight each (as wrk
does for REST). h2load counts HTTP 200 as success, and a gRPC error is an HTTP 200 too (its
status is in the trailers, with no message), so every load is checked: one call first with
grpcio (it must succeed and answer a ``ModelInferResponse``), then the load's received
message bytes must be exactly one such answer per call h2load counts; else the load fails.

``--pid``: also the server's CPU per call by thread (its event loop, the micro-batcher's
thread, grpcio's poller and event-engine threads: ``/proc/PID/task``); ``--metrics``: the
server's ``/metrics`` URL, for its onnxruntime calls and records per call (micro-batches).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections import Counter
from pathlib import Path

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length."""
    return b"\0" + len(message).to_bytes(4, "big") + message


def call(target: str, request: bytes, timeout: float = 10) -> bytes:
    """One ``ModelInfer`` call with grpcio (a real client): the serialized response; raises
    ``grpc.RpcError`` unless the call's status is OK."""
    with grpc.insecure_channel(target) as channel:
        answer: bytes = channel.unary_unary(METHOD)(request, timeout=timeout)
        return answer


def h2load(
    target: str, request: bytes, conns: int, seconds: float, streams: int = 1
) -> tuple[float, int, int, list[int]]:
    """(req/s, calls answered, message bytes received, latency of each call in µs) of ``conns``
    connections with ``streams`` calls in flight each, for ``seconds`` (no warm-up: h2load's
    byte counts would include the warm-up's, and the check below needs them exact)."""
    if not shutil.which("h2load"):
        raise RuntimeError("needs h2load: apt-get install -y nghttp2-client")
    with tempfile.TemporaryDirectory(prefix="grpc-load-") as tmp:
        data, log = Path(tmp, "request"), Path(tmp, "log")
        data.write_bytes(frame(request))
        args = ["-t", "1", "-c", str(conns), "-m", str(streams), "-D", f"{seconds:g}"]
        args += ["-d", str(data), "--log-file", str(log)]
        args += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        out = subprocess.run(
            ["h2load", *args, f"http://{target}{METHOD}"],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        ).stdout
        found = [
            re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out),
            re.search(r"requests: .* (\d+) succeeded, (\d+) failed, (\d+) errored", out),
            re.search(r"\((\d+)\) data", out),
        ]
        if not all(found):
            raise RuntimeError(f"h2load did not report a load:\n{out}")
        rate, counts, received = found  # type: ignore[misc]
        if int(counts[2]) or int(counts[3]):
            raise RuntimeError(f"h2load: calls failed (not HTTP 200) or errored:\n{out}")
        lat = [int(line.split("\t")[2]) for line in log.read_text().splitlines()]
    return float(rate[1]), int(counts[1]), int(received[1]), lat


def run(target: str, request: bytes, conns: int, seconds: float) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, requests) of ``conns`` concurrent calls for ``seconds``,
    every one of them checked to have answered what a lone grpcio call answers."""
    answer = frame(call(target, request))
    rps, ok, received, lat = h2load(target, request, conns, seconds)
    if not lat or received != ok * len(answer):
        missing = ok - received // len(answer)
        raise RuntimeError(
            f"{target}: {missing} of {ok} calls came back without the {len(answer)}-byte "
            f"answer (a gRPC error status: {received} message bytes received)"
        )
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return rps, p50 / 1000, p99 / 1000, ok


def thread_cpu(pid: int) -> Counter[str]:
    """CPU seconds of each thread of ``pid``, by name and id."""
    out: Counter[str] = Counter()
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        out[f"{name} ({task.name})"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def batches(url: str) -> tuple[float, float]:
    """(onnxruntime calls, records scored) so far, from the server's metrics."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = dict(re.findall(r"^vae_anomaly_batch_size_(count|sum) (\S+)$", text, re.M))
    return float(found["count"]), float(found["sum"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="host:port")
    p.add_argument("request", type=Path, help="a serialized ModelInferRequest")
    p.add_argument("-c", "--conns", type=int, default=64, help="connections, one call each")
    p.add_argument("-d", "--seconds", type=float, default=5)
    p.add_argument("--pid", type=int, help="the server's process: its CPU per call, by thread")
    p.add_argument("--metrics", help="the server's /metrics URL: records per onnxruntime call")
    a = p.parse_args()
    cpu0 = thread_cpu(a.pid) if a.pid else Counter()
    calls0 = batches(a.metrics) if a.metrics else (0.0, 0.0)
    try:
        rps, p50, p99, n = run(a.target, a.request.read_bytes(), a.conns, a.seconds)
    except grpc.RpcError as e:
        print(f"call failed: {e.code()}: {e.details()}", file=sys.stderr)
        return 1
    print(f"{n} calls, {rps:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    if a.metrics:
        count, rows = (x - x0 for x, x0 in zip(batches(a.metrics), calls0, strict=True))
        print(f"{count:,.0f} onnxruntime calls, {rows / max(count, 1):.1f} records each")
    if a.pid:
        for thread, seconds in sorted((thread_cpu(a.pid) - cpu0).items()):
            print(f"  {thread:28} {seconds / n * 1e6:5.0f} us per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
