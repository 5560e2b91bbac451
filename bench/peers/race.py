"""The race: our endpoints against MLServer, KServe and BentoML serving the same model.onnx.

    bash bench/peers/setup.sh                  # once: the peers' venvs, /work/peer-venvs
    python bench/peers/race.py [--bundle DIR] [--seconds 5] [--rounds 3] [--only ours,trivial]
        [--endpoints gRPC,native]  # only the endpoints whose labels contain one of these
        [--baseline DIR]  # also ours from another source tree (e.g. `git archive main`)

Starts every server side by side on 127.0.0.1, one process each, onnxruntime at 1 thread:
ours (native ``/v1/score``, V2 JSON, V2 binary tensors, V2 gRPC; and native and gRPC again with
the micro-batcher's extra wait at 2 ms), a trivial FastAPI endpoint
(the HTTP ceiling), MLServer (custom runtime, adaptive batching on and off), KServe's model
server (custom model, logging as shipped and off), BentoML (async service). Then, round after
round, loads each endpoint in turn (interleaved, so a busy moment of the shared machine hits
them all alike): single-record requests at each concurrency (req/s, p50, p99) and 1,000-record
requests (rows/s); REST with wrk, gRPC with h2load (bench/grpc_load.py: both C, one thread,
c connections with one request in flight each). Prints medians over the rounds, with the
server's CPU per request (its process tree's CPU time over the requests answered: what a
request costs the server, whatever the load generator's own cost). The peers get the model's
tensors (x_num, x_cat) and answer its score; ours get the records' fields and also validate,
preprocess, explain and count them. The "grpcio floor" rows are grpcio servers whose handler
answers fixed bytes (bench/peers/grpc_floor.py): the most any grpcio endpoint can do here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the bench scripts beside this folder
from grpc_load import call as grpc_call  # type: ignore[import-not-found]  # noqa: E402
from grpc_load import run as grpc_run  # type: ignore[import-not-found]  # noqa: E402
from microbatch import free_port, wrk  # type: ignore[import-not-found]  # noqa: E402

from service.bundle import read_bundle  # noqa: E402
from service.features import encode_columns  # noqa: E402
from service.proto import predict_v2_pb2 as pb  # noqa: E402

BIN = Path(sys.executable).parent
INFER = "/v2/models/{}/infer"


# ---------------------------------------------------------------- request bodies


def tensors(df: pd.DataFrame, feats: Any) -> list[tuple[str, str, list[Any]]]:
    """(name, datatype, values) per feature, as a V2 client would type them."""
    out = []
    for f in feats:
        col = df[f.name]
        if f.kind == "numeric":
            out.append((f.name, "FP64", col.astype(float).tolist()))
        else:
            out.append((f.name, "BOOL" if f.kind == "boolean" else "BYTES", col.tolist()))
    return out


def raw(dt: str, values: list[Any]) -> bytes:
    if dt == "BYTES":
        return b"".join(len(b).to_bytes(4, "little") + b for b in (v.encode() for v in values))
    return np.asarray(
        values, {"FP64": "<f8", "BOOL": "u1", "FP32": "<f4", "INT64": "<i8"}[dt]
    ).tobytes()


def v2_json(ts: list[tuple[str, str, list[Any]]]) -> bytes:
    inputs = [{"name": n, "shape": [len(v)], "datatype": dt, "data": v} for n, dt, v in ts]
    return json.dumps({"inputs": inputs}).encode()


def v2_binary(ts: list[tuple[str, str, list[Any]]]) -> tuple[bytes, bytes]:
    """(body, JSON part) of a binary-tensor request asking for binary outputs (tritonclient's
    defaults)."""
    blobs = [raw(dt, v) for _, dt, v in ts]
    inputs = [
        {"name": n, "shape": [len(v)], "datatype": dt, "parameters": {"binary_data_size": len(b)}}
        for (n, dt, v), b in zip(ts, blobs, strict=True)
    ]
    head = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    return head + b"".join(blobs), head


def grpc_request(model: str, ts: list[tuple[str, str, list[Any]]], typed: bool) -> bytes:
    """A serialized ModelInferRequest: ``raw_input_contents`` (tritonclient's way), or typed
    ``contents`` (which every V2 server reads)."""
    req = pb.ModelInferRequest(model_name=model)
    for name, dt, values in ts:
        t = req.inputs.add(name=name, datatype=dt, shape=np.shape(values))
        if not typed:
            req.raw_input_contents.append(raw(dt, values))
        elif dt == "FP32":
            t.contents.fp32_contents.extend(np.ravel(values).tolist())
        elif dt == "INT64":
            t.contents.int64_contents.extend(np.ravel(values).tolist())
        else:
            raise ValueError(dt)
    return bytes(req.SerializeToString())


def lua(body: bytes, headers: dict[str, str]) -> str:
    """A wrk script POSTing ``body`` (any bytes: escaped as Lua decimal escapes)."""
    text = "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\{b:03d}" for b in body)
    lines = ['wrk.method = "POST"', f'wrk.body = "{text}"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- servers and endpoints


@dataclass
class Endpoint:
    label: str
    server: str
    kind: str  # "http" (wrk) or "grpc"
    path: str  # URL path, or the gRPC port's name in the server's ports
    bodies: dict[int, tuple[bytes, dict[str, str]]]  # records per request -> body, headers


@dataclass
class Server:
    name: str
    command: Callable[[dict[str, int]], list[str]]
    ports: tuple[str, ...] = ("http",)
    env: dict[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    port: dict[str, int] | None = None


def servers(bundle: Path, venvs: Path, tmp: Path, baseline: Path | None) -> list[Server]:
    onnx = str(bundle / "model.onnx")
    mls = {on: mlserver_dir(tmp / f"mlserver-{on}", onnx, on) for on in ("on", "off")}
    kserve = [str(venvs / "kserve/bin/python"), str(HERE / "kserve_server.py")]
    quiet = ["--enable_latency_logging", "false", "--configure_logging", "false"]

    def ks(p: dict[str, int], extra: list[str]) -> list[str]:
        return [*kserve, "--http_port", str(p["http"]), "--grpc_port", str(p["grpc"]), *extra]

    def ml(on: str) -> Callable[[dict[str, int]], list[str]]:
        return lambda p: [str(venvs / "mlserver/bin/mlserver"), "start", mlserver_ports(mls[on], p)]

    peer = {"PEER_MODEL": onnx, "BENTOML_HOME": str(tmp / "bentoml")}
    floor = [sys.executable, str(HERE / "grpc_floor.py"), str(floor_response(bundle, tmp))]

    def ours(p: dict[str, int]) -> list[str]:
        return [str(BIN / "vae-anomaly"), "serve", "--bundle", str(bundle), "--port",
                str(p["http"]), "--grpc-port", str(p["grpc"])]  # fmt: skip

    # the micro-batcher's extra wait under load (VAE_ANOMALY_BATCH_MAX_WAIT_MS): gRPC calls
    # reach the event loop one at a time, so without it their batches stay small
    wait = {"VAE_ANOMALY_BATCH_MAX_WAIT_MS": "2"}
    # the same command with ``service`` imported from another tree (PYTHONPATH comes before the
    # editable install's finder): a change raced against the code before it, in one run
    base = {"PYTHONPATH": str(baseline)} if baseline else None
    return [
        Server("ours", ours, ("http", "grpc")),
        *([Server("ours baseline", ours, ("http", "grpc"), base)] if base else []),
        Server("ours batch wait 2 ms", ours, ("http", "grpc"), wait),
        Server("trivial", lambda p: [sys.executable, str(HERE.parent / "naive_service.py"),
               "trivial", str(bundle), str(p["http"])]),
        Server("grpcio floor", lambda p: [*floor, str(p["grpc"])], ("grpc",)),
        Server("grpcio floor sync", lambda p: [*floor, str(p["grpc"]), "--sync"], ("grpc",)),
        Server("mlserver batching on", ml("on"), ("http", "grpc", "metrics")),
        Server("mlserver batching off", ml("off"), ("http", "grpc", "metrics")),
        Server("kserve logging as shipped", lambda p: ks(p, []), ("http", "grpc"), peer),
        Server("kserve logging off", lambda p: ks(p, quiet), ("http", "grpc"), peer),
        Server("bentoml async", lambda p: [str(venvs / "bentoml/bin/bentoml"), "serve",
               "bento_service:Scorer", "--host", "127.0.0.1", "--port", str(p["http"])],
               env=peer, cwd=HERE),
    ]  # fmt: skip


def floor_response(bundle: Path, tmp: Path) -> Path:
    """A file holding what our ``ModelInfer`` answers to one record (the floor servers' answer)."""
    m = read_bundle(bundle).manifest
    resp = pb.ModelInferResponse(model_name=m.name, model_version=m.version)
    resp.parameters["score_type"].string_param = m.default_score
    resp.parameters["threshold"].double_param = 1.0
    for name, datatype, raw in (("score", "FP64", 8), ("is_anomaly", "BOOL", 1),
                                ("percentile", "FP64", 8)):  # fmt: skip
        resp.outputs.add(name=name, datatype=datatype, shape=[1])
        resp.raw_output_contents.append(bytes(raw))
    path = tmp / "floor-response.bin"
    path.write_bytes(resp.SerializeToString())
    return path


def mlserver_dir(folder: Path, onnx: str, batching: str) -> Path:
    """An MLServer model folder: the runtime, its model settings (adaptive batching on: up to
    64 requests or 2 ms; off: none)."""
    folder.mkdir(parents=True)
    (folder / "mlserver_runtime.py").write_bytes((HERE / "mlserver_runtime.py").read_bytes())
    model = {"name": "vae", "implementation": "mlserver_runtime.OnnxScorer",
             "parameters": {"uri": onnx}}  # fmt: skip
    if batching == "on":
        model |= {"max_batch_size": 64, "max_batch_time": 0.002}
    (folder / "model-settings.json").write_text(json.dumps(model))
    return folder


def mlserver_ports(folder: Path, p: dict[str, int]) -> str:
    settings = {"host": "127.0.0.1", "http_port": p["http"], "grpc_port": p["grpc"],
                "metrics_port": p["metrics"], "parallel_workers": 0}  # fmt: skip
    (folder / "settings.json").write_text(json.dumps(settings))
    return str(folder)


def endpoints(bundle: Path, sizes: list[int]) -> list[Endpoint]:
    """Every endpoint of the race, with its bodies of each size."""
    from training.demo_data import generate_payments

    m = read_bundle(bundle).manifest
    df = generate_payments(max(*sizes, 1000), seed=7)
    # binary tensors have no null: missing values take a value the column has (same for all)
    df = df.fillna({c: df[c].dropna().iloc[0] for c in df.columns[df.isna().any()]})
    js = {"Content-Type": "application/json"}
    body: dict[str, dict[int, tuple[bytes, dict[str, str]]]] = {}
    for n in sizes:
        part = df.iloc[:n]
        ts = tensors(part, m.features)
        x = encode_columns(m.features, {f.name: part[f.name].to_numpy() for f in m.features})
        model_ts = [
            ("x_num", "FP32", x.inputs["x_num"].tolist()),
            ("x_cat", "INT64", x.inputs["x_cat"].tolist()),
        ]
        binary, head = v2_binary(ts)
        peer_inputs = [
            {"name": a, "shape": list(np.shape(v)), "datatype": d, "data": v}
            for a, d, v in model_ts
        ]
        for name, value, headers in (
            ("native", {"records": json.loads(part.to_json(orient="records"))}, js),
            ("v2 json", v2_json(ts), js),
            ("v2 binary", binary, {"Content-Type": "application/octet-stream",
                                   "Inference-Header-Content-Length": str(len(head))}),
            ("v2 grpc", grpc_request(m.name, ts, typed=False), {}),
            ("peer json", {"inputs": peer_inputs}, js),
            ("peer grpc", grpc_request("vae", model_ts, typed=True), {}),
            ("bento", {"x_num": model_ts[0][2], "x_cat": model_ts[1][2]}, js),
        ):  # fmt: skip
            raw_body = value if isinstance(value, bytes) else json.dumps(value).encode()
            body.setdefault(name, {})[n] = (raw_body, headers)
    eps = []
    for label, path, kind in (("native /v1/score", "/v1/score", "native"),
                              ("V2 JSON", INFER.format(m.name), "v2 json"),
                              ("V2 binary", INFER.format(m.name), "v2 binary"),
                              ("V2 gRPC", "grpc", "v2 grpc")):  # fmt: skip
        for server, tag in (("ours", ""), ("ours baseline", ", baseline")):  # side by side
            how = "grpc" if kind == "v2 grpc" else "http"
            eps.append(Endpoint(f"ours {label}{tag}", server, how, path, body[kind]))
    eps += [
        Endpoint(
            "ours native, batch wait 2 ms",
            "ours batch wait 2 ms",
            "http",
            "/v1/score",
            body["native"],
        ),
        Endpoint(
            "ours V2 gRPC, batch wait 2 ms", "ours batch wait 2 ms", "grpc", "grpc", body["v2 grpc"]
        ),
        Endpoint("trivial FastAPI", "trivial", "http", "/v1/score", {1: body["native"][1]}),
        Endpoint("grpcio floor (aio)", "grpcio floor", "grpc", "grpc", {1: body["v2 grpc"][1]}),
        Endpoint(
            "grpcio floor (sync)", "grpcio floor sync", "grpc", "grpc", {1: body["v2 grpc"][1]}
        ),
    ]
    for s in ("mlserver batching on", "mlserver batching off", "kserve logging as shipped",
              "kserve logging off"):  # fmt: skip
        eps.append(Endpoint(f"{s}, REST", s, "http", INFER.format("vae"), body["peer json"]))
        eps.append(Endpoint(f"{s}, gRPC", s, "grpc", "grpc", body["peer grpc"]))
    eps.append(Endpoint("bentoml async, REST", "bentoml async", "http", "/score", body["bento"]))
    return eps


# ---------------------------------------------------------------- running


def start(server: Server, first: Endpoint, tmp: Path) -> None:
    """Start ``server`` in its own process group (output in ``tmp``) and wait until ``first``
    answers."""
    server.port = {p: free_port() for p in server.ports}
    log = (tmp / f"{server.name.replace(' ', '-')}.log").open("wb")
    server.proc = subprocess.Popen(
        server.command(server.port),
        env={**os.environ, **(server.env or {})},
        cwd=server.cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline, error = time.monotonic() + 180, ""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}")
        try:
            once(server, first)
            return
        except Exception as e:
            error = str(e)
            time.sleep(0.5)
    raise RuntimeError(f"{server.name} did not answer within 180 s: {error}; see {log.name}")


def once(server: Server, ep: Endpoint) -> None:
    """One request of ``ep``'s smallest body; raises unless it succeeds."""
    assert server.port is not None
    payload, headers = ep.bodies[min(ep.bodies)]
    if ep.kind == "grpc":
        pb.ModelInferResponse.FromString(grpc_call(f"127.0.0.1:{server.port['grpc']}", payload))
        return
    url = f"http://127.0.0.1:{server.port['http']}{ep.path}"
    req = urllib.request.Request(url, payload, headers, method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


def stop(server: Server) -> None:
    if server.proc is not None and server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)  # the group this script started
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its descendants."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def measure(
    server: Server, ep: Endpoint, n: int, conns: int, seconds: int, tmp: Path
) -> tuple[float, float, float, float]:
    """(req/s, p50 ms, p99 ms, server CPU µs per request) of one bounded load."""
    assert server.port is not None and server.proc is not None
    payload, headers = ep.bodies[n]
    cpu0 = tree_cpu(server.proc.pid)
    if ep.kind == "grpc":
        target = f"127.0.0.1:{server.port['grpc']}"
        rps, p50, p99, count = grpc_run(target, payload, conns, seconds)
    else:
        script = tmp / "load.lua"
        script.write_text(lua(payload, headers))
        url = f"http://127.0.0.1:{server.port['http']}{ep.path}"
        rps, p50, p99 = wrk(url, script, conns, seconds)
        count = rps * seconds
    return rps, p50, p99, (tree_cpu(server.proc.pid) - cpu0) / max(count, 1) * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="default: the demo model")
    p.add_argument("--venvs", type=Path, default=Path(os.environ.get("PEER_VENVS",
                   "/work/peer-venvs")))  # fmt: skip
    p.add_argument("--seconds", type=int, default=5, help="per load")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--conns", default="1,8,64", help="concurrencies, single-record requests")
    p.add_argument("--big", type=int, default=1000, help="records per big request (0: none)")
    p.add_argument("--big-conns", type=int, default=2)
    p.add_argument("--only", help="comma-separated server names (default: all)")
    p.add_argument("--endpoints", help="comma-separated parts of endpoint labels (default: all)")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("--table", type=Path, help="only print a --json file as a Markdown table")
    p.add_argument(
        "--baseline",
        type=Path,
        help="a source tree holding service/ (e.g. `git archive main service | tar -x -C DIR`):"
        " also race ours from it, as the server 'ours baseline'",
    )
    a = p.parse_args()
    if a.table is not None:
        print(markdown(json.loads(a.table.read_text())))
        return 0
    if a.bundle is None:
        from training.cli import demo_bundle

        a.bundle = demo_bundle(progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="race-"))
    conns = [int(c) for c in a.conns.split(",")]
    sizes = [1, a.big] if a.big else [1]
    chosen = set(a.only.split(",")) if a.only else None
    if chosen and "ours" in chosen:
        chosen.add("ours baseline")  # (there is one only with --baseline)
    srvs = {
        s.name: s
        for s in servers(a.bundle, a.venvs, tmp, a.baseline)
        if not chosen or s.name in chosen
    }
    parts = a.endpoints.split(",") if a.endpoints else [""]
    eps = [e for e in endpoints(a.bundle, sizes) if e.server in srvs and
           any(part in e.label for part in parts)]  # fmt: skip
    srvs = {name: s for name, s in srvs.items() if any(e.server == name for e in eps)}
    results: dict[tuple[str, int, int], list[tuple[float, float, float, float]]] = {}
    try:
        for s in srvs.values():
            start(s, next(e for e in eps if e.server == s.name), tmp)
            print(f"started {s.name}", flush=True)
        for r in range(a.rounds):
            for ep in eps:
                loads = [(1, c) for c in conns] + [(n, a.big_conns) for n in sizes[1:] if n in
                                                   ep.bodies]  # fmt: skip
                for n, c in loads:
                    m = measure(srvs[ep.server], ep, n, c, a.seconds, tmp)
                    results.setdefault((ep.label, n, c), []).append(m)
                    print(f"round {r + 1}: {ep.label}, {n} rec, c={c}: {m[0]:,.0f} req/s, "
                          f"p50 {m[1]:.2f} ms, p99 {m[2]:.2f} ms, {m[3]:.0f} us CPU/req",
                          flush=True)  # fmt: skip
    finally:
        for s in srvs.values():
            stop(s)
    report(results, a.json)
    return 0


def report(results: dict[tuple[str, int, int], list[Any]], out: Path | None) -> None:
    """Medians over the rounds, one row per endpoint, load."""
    print(f"\n{'endpoint':38} {'load':>14} {'req/s':>8} {'rows/s':>9} {'p50':>7} {'p99':>7} "
          f"{'CPU/req':>8}")  # fmt: skip
    rows = []
    for (label, n, c), ms in results.items():
        rps, p50, p99, cpu = (statistics.median(x[i] for x in ms) for i in range(4))
        rows.append({"endpoint": label, "records": n, "conns": c, "req_s": rps,
                     "rows_s": rps * n, "p50_ms": p50, "p99_ms": p99, "cpu_us": cpu,
                     "runs": ms})  # fmt: skip
        print(f"{label:38} {f'{n} rec, c={c}':>14} {rps:8,.0f} {rps * n:9,.0f} {p50:7.2f} "
              f"{p99:7.2f} {cpu:8.0f}")  # fmt: skip
    if out is not None:
        out.write_text(json.dumps(rows, indent=1))


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per endpoint: req/s, p50 and p99 by concurrency, big requests' rows/s, and
    the server's CPU per single-record request at the highest concurrency."""
    by: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["endpoint"], {})[(r["records"], r["conns"])] = r
    single = sorted({c for cells in by.values() for n, c in cells if n == 1})
    head = [f"c={c}: req/s, p50 / p99 ms" for c in single]
    out = [
        "| endpoint | " + " | ".join(head) + " | 1,000-record requests: rows/s | "
        f"server CPU per request, c={single[-1]} |",
        "|---" * (len(single) + 3) + "|",
    ]
    for label, cells in by.items():
        cols = []
        for c in single:
            r = cells.get((1, c))
            cols.append(f"{r['req_s']:,.0f}, {r['p50_ms']:.1f} / {r['p99_ms']:.1f}" if r else "")
        big = [r for (n, _), r in cells.items() if n > 1]
        cols.append(f"{big[0]['rows_s']:,.0f}" if big else "")
        top = cells.get((1, single[-1]))
        cols.append(f"{top['cpu_us']:.0f} µs" if top else "")
        out.append(f"| {label} | " + " | ".join(cols) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
