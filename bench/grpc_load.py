"""A bounded gRPC load generator for the V2 ``ModelInfer`` call (there is no ghz here).

    python bench/grpc_load.py HOST:PORT REQUEST.bin [-c 64] [-d 5]

Keeps ``c`` calls in flight on one asyncio event loop for ``d`` seconds and prints requests/s,
p50 and p99 (ms). The request is sent as the serialized ``ModelInferRequest`` bytes it is given
and replies are not decoded, so the client spends as little CPU as it can per call (it is still
Python: it shares the machine's cores with the server under test, which wrk does far more
cheaply; compare servers by the server's CPU per request too, as bench/peers/race.py does).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import grpc
from grpc import aio

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def load(
    target: str, request: bytes, conns: int, seconds: float
) -> tuple[float, list[float]]:
    """(seconds the load took, latency of each call in seconds); a failed call raises."""
    latencies: list[float] = []
    async with aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: no (de)serialisation
        await call(request, timeout=30)  # the connection is up before the clock starts
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            now = time.perf_counter()
            while now < deadline:
                await call(request, timeout=30)
                done = time.perf_counter()
                latencies.append(done - now)
                now = done

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = time.perf_counter() - start
    return elapsed, latencies


def run(target: str, request: bytes, conns: int, seconds: float) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, requests) of ``conns`` concurrent calls for ``seconds``."""
    elapsed, lat = asyncio.run(load(target, request, conns, seconds))
    lat.sort()
    if not lat:
        raise RuntimeError(f"no call to {target} was answered")
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return len(lat) / elapsed, p50 * 1000, p99 * 1000, len(lat)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="host:port")
    p.add_argument("request", type=Path, help="a serialized ModelInferRequest")
    p.add_argument("-c", "--conns", type=int, default=64, help="calls in flight")
    p.add_argument("-d", "--seconds", type=float, default=5)
    a = p.parse_args()
    try:
        rps, p50, p99, n = run(a.target, a.request.read_bytes(), a.conns, a.seconds)
    except grpc.RpcError as e:
        print(f"call failed: {e.code()}: {e.details()}", file=sys.stderr)
        return 1
    print(f"{n} calls, {rps:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
