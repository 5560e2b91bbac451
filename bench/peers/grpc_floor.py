"""The grpcio floor: a gRPC server whose ``ModelInfer`` does nothing but answer fixed bytes.

    python bench/peers/grpc_floor.py RESPONSE.bin PORT [--sync]

A generic handler (raw bytes in, the same bytes out every call: no protobuf, no model), with
the server options and event loop ours runs with (``grpc.aio`` on uvloop; ``--sync``: grpcio's
thread-pool server instead). Whatever an endpoint built on grpcio does, it cannot answer faster
than this on the same machine and load: bench/peers/race.py runs it as the row "grpcio floor".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

SERVICE = "inference.GRPCInferenceService"


def handlers(answer: Any) -> list[Any]:
    rpc = grpc.unary_unary_rpc_method_handler(answer)  # no (de)serializers: bytes as they are
    return [grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": rpc})]


async def serve_aio(port: int, response: bytes) -> None:
    async def answer(request: bytes, context: Any) -> bytes:
        return response

    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(handlers(answer))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def serve_sync(port: int, response: bytes) -> None:
    server = grpc.server(ThreadPoolExecutor(8), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(handlers(lambda request, context: response))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("response", type=Path, help="the serialized response to answer every call")
    p.add_argument("port", type=int)
    p.add_argument("--sync", action="store_true", help="grpcio's thread-pool server")
    a = p.parse_args()
    response = a.response.read_bytes()
    if a.sync:
        serve_sync(a.port, response)
        return 0
    try:
        import uvloop

        uvloop.run(serve_aio(a.port, response))
    except ImportError:
        asyncio.run(serve_aio(a.port, response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
