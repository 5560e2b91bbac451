"""Our ``ModelInfer`` without grpcio: the part of a gRPC call's CPU that is ours.

    python bench/peers/grpc_handler.py BUNDLE REQUEST.bin [--callers 64] [--calls 300]

The grpcio floor (grpc_floor.py) is grpcio without our handler; this is our handler without
grpcio: the app's start-up as under uvicorn (model, micro-batcher), then ``callers`` coroutines
on uvloop, each calling the gRPC handler (the one ``service/grpc_v2.py`` registers, with its
timeout, metrics and log line) ``calls`` times with the serialized request. Prints calls/s and
the CPU per call of the event loop's thread and of the whole process (the loop plus the
micro-batcher's thread). The two together say where a real call's CPU goes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from service import grpc_v2
from service.app import create_app
from service.settings import Settings


class Context:
    """What the handler asks of grpcio's context on a successful call (no API keys here)."""

    def invocation_metadata(self) -> tuple[Any, ...]:
        return ()

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


async def drive(bundle: Path, request: bytes, callers: int, calls: int) -> None:
    app = create_app(Settings(bundle=bundle, log_level="warning"))
    async with app.router.lifespan_context(app):
        service = grpc_v2.InferenceService(app.state)
        call = grpc_v2.observed("ModelInfer", service.ModelInfer, 30)
        context = Context()

        async def caller(n: int) -> None:
            for _ in range(n):
                await call(request, context)
                await asyncio.sleep(0)  # the next call comes in a later turn, as over the wire

        await asyncio.gather(*(caller(max(calls // 6, 1)) for _ in range(callers)))  # warm-up
        wall, loop, process = time.perf_counter(), time.thread_time(), time.process_time()
        await asyncio.gather(*(caller(calls) for _ in range(callers)))
        n = callers * calls
        wall, loop = time.perf_counter() - wall, time.thread_time() - loop
        process = time.process_time() - process
        print(f"{n:,} calls, {n / wall:,.0f} calls/s; CPU per call: event loop "
              f"{loop / n * 1e6:.1f} us, process {process / n * 1e6:.1f} us")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("request", type=Path, help="a serialized ModelInferRequest")
    p.add_argument("--callers", type=int, default=64)
    p.add_argument("--calls", type=int, default=300, help="per caller")
    a = p.parse_args()
    uvloop.run(drive(a.bundle, a.request.read_bytes(), a.callers, a.calls))
    return 0


if __name__ == "__main__":  # the parser process's fork server imports this module
    sys.exit(main())
