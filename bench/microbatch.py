"""Micro-batching: requests/s and latency of single-record requests by concurrency and wait.

    python bench/microbatch.py [--bundle DIR] [--seconds 5]

Starts the real service (1 worker) on 127.0.0.1 for each setting and loads it with wrk (Debian
package), single-record POST /v1/score, at concurrency 1, 8 and 64; prints requests/s, p50 and
p99 for: batching off, and batching with extra waits of 0, 0.2 and 1 ms. wrk and the server share
the machine's cores: compare rows within one run, not across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
"""
SETTINGS = {
    "off": {"VAE_ANOMALY_BATCH_MAX_RECORDS": "0"},
    "wait 0": {"VAE_ANOMALY_BATCH_MAX_WAIT_MS": "0"},
    "wait 0.2 ms": {"VAE_ANOMALY_BATCH_MAX_WAIT_MS": "0.2"},
    "wait 1 ms": {"VAE_ANOMALY_BATCH_MAX_WAIT_MS": "1"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, script: Path, conns: int, seconds: int) -> tuple[float, float, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "1",
            "-c",
            str(conns),
            "-d",
            f"{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out:
        raise RuntimeError(out)
    return rps, p50, p99


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path)
    p.add_argument("--seconds", type=int, default=5)
    a = p.parse_args()
    if not shutil.which("wrk"):
        print("needs wrk (apt-get install wrk)", file=sys.stderr)
        return 1
    from training.cli import demo_bundle
    from training.demo_data import generate_payments

    bundle = a.bundle or demo_bundle(progress=False)
    rec = {
        k: (None if isinstance(v, float) and v != v else v)
        for k, v in generate_payments(1, seed=7).iloc[0].to_dict().items()
    }
    tmp = Path(tempfile.mkdtemp())
    script = tmp / "post.lua"
    script.write_text(LUA % json.dumps({"records": [rec]}, default=str))
    exe = Path(sys.executable).parent / "vae-anomaly"
    print(f"{'setting':12} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, env in SETTINGS.items():
        port = free_port()
        proc = subprocess.Popen(
            [
                str(exe),
                "serve",
                "--bundle",
                str(bundle),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}/v1/score"
        try:
            for _ in range(100):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            for conns in (1, 8, 64):
                rps, p50, p99 = wrk(url, script, conns, a.seconds)
                print(f"{name:12} {conns:>4} {rps:8.0f} {p50:8.2f} {p99:8.2f}", flush=True)
        finally:
            proc.terminate()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
