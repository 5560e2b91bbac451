"""Shared fixtures (sample payments, a small bundle trained once per test session) and the
helpers the test modules share: test modules import from here, never from each other."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.bundle import read_bundle
from service.cli import main
from service.registry import Registry, new_version
from service.settings import Settings
from training.config import TrainConfig
from training.demo_data import generate_payments
from training.train import Result, train_bundle

ROOT = Path(__file__).resolve().parent.parent  # the repository
PROM = ROOT / "deploy" / "prometheus"
TRAIN_ROWS = 5000
EPOCHS = 40  # small and quick; early stopping may end sooner


E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e/ runs real processes: it is in the slow tier."""
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.slow)


def small_config(**kw: object) -> TrainConfig:
    base: dict[str, object] = {"exclude": ["transaction_id"], "epochs": EPOCHS}
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def train_df() -> pd.DataFrame:
    return generate_payments(TRAIN_ROWS, seed=0)


def fit_small(df: pd.DataFrame, out: Path, cfg: TrainConfig) -> Result:
    """Train ``df`` into the bundle folder ``out`` with ``cfg`` (quietly)."""
    return train_bundle(df, out, cfg, source="x.csv", data_fingerprint="x", progress=False)


@pytest.fixture(scope="session")
def trained(train_df: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Result:
    out = tmp_path_factory.mktemp("bundles") / "payments"
    return train_bundle(
        train_df,
        out,
        small_config(name="payments"),
        source="payments.csv",
        data_fingerprint="test",
        progress=False,
    )


@pytest.fixture(scope="session")
def bundle_dir(trained: Result) -> Path:
    return trained.path


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``vae-anomaly ARGV`` in this process (service.cli.main): exit code, stdout, stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def add_version(
    reg: Registry, df: pd.DataFrame, seed: int = 0, promote: bool = False, epochs: int = 8
) -> str:
    """Train a small model on ``df`` into a new version of ``reg`` (and promote it)."""
    v = new_version()
    train_bundle(
        df,
        reg.version_path(v),
        small_config(epochs=epochs, seed=seed),
        source="t.csv",
        data_fingerprint="t",
        progress=False,
        version=v,
        parent_version=reg.serving(),
    )
    if promote:
        reg.promote(v)
    return v


@pytest.fixture(scope="session")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A registry with v1 serving and v2 (same features) not yet promoted."""
    reg = Registry(tmp_path_factory.mktemp("reg") / "registry", create=True)
    v1 = add_version(reg, generate_payments(1500, seed=60), seed=1, promote=True)
    v2 = add_version(reg, generate_payments(1500, seed=61), seed=2)
    return reg.root, v1, v2


@pytest.fixture(scope="session")
def serving_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry of one serving version, trained by `vae-anomaly train --registry`."""
    tmp = tmp_path_factory.mktemp("retrain")
    data = tmp / "old.csv"
    generate_payments(3000, seed=65).to_csv(data, index=False)
    assert (
        main(
            [
                "train",
                str(data),
                "--registry",
                str(tmp / "reg"),
                "--epochs",
                "25",
                "--quiet",
                "--exclude",
                "transaction_id",
            ]
        )
        == 0
    )
    return tmp / "reg"


# drifted demo data
AGE_SD = 14.0  # customer_age ~ N(45, 14) in the demo data


def shifted_age(df: pd.DataFrame) -> pd.DataFrame:
    """The same records, every customer one standard deviation older."""
    return df.assign(customer_age=df["customer_age"] + AGE_SD)


def grocery_heavy(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The same records, 60% of them moved to the merchant category "grocery"."""
    rng = np.random.default_rng(seed)
    cat = df["merchant_category"].to_numpy(copy=True)
    cat[rng.random(len(df)) < 0.6] = "grocery"
    return df.assign(merchant_category=cat)


# ---------------------------------------------------------------- a real server in a subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_executable(venv_bin: Path | None = None) -> str:
    """The vae-anomaly entry point beside this interpreter (the venv's), else on PATH."""
    exe = shutil.which("vae-anomaly", path=str(venv_bin or Path(sys.executable).parent))
    exe = exe or shutil.which("vae-anomaly")
    assert exe, "the vae-anomaly entry point is not installed"
    return exe


def run_cli(
    *args: str | Path,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """``vae-anomaly ARGS`` as a process of its own (after ``prefix``, say ``taskset -c 0``), with
    ``env`` added to this one's; its output as text."""
    return subprocess.run(
        [*prefix, cli_executable(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env} if env else None,
    )


def drift_json(bundle: Path, data: Path, tmp: Path) -> dict[str, Any]:
    """`vae-anomaly drift BUNDLE DATA --json` (and its HTML report in ``tmp``), parsed."""
    r = run_cli("drift", bundle, data, "--json", "--html", tmp / "r.html", timeout=120)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_server(
    args: list[str],
    tmp: Path,
    env: dict[str, str] | None = None,
    exe: str | None = None,
    timeout: float = 120.0,
    port: int | None = None,
) -> Iterator[Server]:
    """Start `vae-anomaly <args> --port P` on 127.0.0.1 (a free port unless given), wait until
    /readyz answers 200, stop it (SIGTERM, then SIGKILL) on exit."""
    port = port or free_port()
    log = tmp / f"server-{port}.log"
    full_env = {**os.environ, **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe or cli_executable(), *args, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.logs()}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout} s:\n{server.logs()}")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def healthz_seconds(server: Server) -> float:
    """Wall time of one GET /healthz on a fresh connection, from connect to the last byte."""
    host, port = server.url.removeprefix("http://").split(":")
    start = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    elapsed = time.perf_counter() - start
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return elapsed


def health_while(server: Server, call: Callable[[], Any]) -> tuple[Any, list[float]]:
    """(what ``call`` returned, run in a thread; wall times of the /healthz calls polled
    meanwhile): a server whose event loop stands still answers them late."""
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(call()))
    t.start()
    times = [healthz_seconds(server)]
    while t.is_alive():
        time.sleep(0.005)
        times.append(healthz_seconds(server))
    t.join()
    return result[0], times


# ---------------------------------------------------------------- the app in this process


class InProcess:
    """The service's ASGI app in the test process, spoken to with httpx's ``ASGITransport``: no
    socket, no server process, so logic tests take milliseconds. Its lifespan runs as under
    uvicorn (the model loaded and warmed up, the micro-batcher and the body-parser helper
    started) on an event loop in a thread of its own, so tests call it synchronously."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.lifespan = self.app.router.lifespan_context(self.app)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://in-process", timeout=30
        )

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def __enter__(self) -> InProcess:
        self.thread.start()
        safe_path = os.environ.get("PYTHONSAFEPATH")
        self._run(self.lifespan.__aenter__())
        if safe_path is None:  # the parser helper sets it for its fork server: not for us
            os.environ.pop("PYTHONSAFEPATH", None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.app.state.models.scorer is not None:  # its drift series leave with the app, as
            self.app.state.models.scorer.drift.retire()  # with a process: others count them too
        self._run(self.client.aclose())
        self._run(self.lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()
        gc.unfreeze()  # the app tunes the collector for serving; give the tests theirs back
        gc.set_threshold(*GC_THRESHOLD)

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        content = kw.get("content")
        if content is not None and not isinstance(content, bytes | str):
            kw["content"] = _async_chunks(list(content))  # a streamed body, as over a socket
        response: httpx.Response = self._run(self.client.request(method, url, **kw))
        return response

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)


async def _async_chunks(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


GC_THRESHOLD = gc.get_threshold()


def in_process(bundle: Path, **settings: Any) -> InProcess:
    """The app serving ``bundle`` with these settings (``with in_process(...) as client``)."""
    return InProcess(create_app(Settings(bundle=bundle, **settings)))


# ---------------------------------------------------------------- a real Prometheus server


def tool(name: str) -> str:
    """A command from the venv (pip-installed tools) or the system (Debian packages)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed (.ci/system-deps installs it)"
    return found


def prometheus_query(url: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.fixture
def prometheus_on(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str, rules_text: str | None = None) -> str:
        """Prometheus scraping ``target`` every second with the shipped rules (or these)."""
        port = free_port()
        rules = tmp_path / "rules.yml"
        rules.write_text(rules_text or (PROM / "rules.yml").read_text())
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": "vae-anomaly", "static_configs": [{"targets": [target]}]}
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=log,
            )
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.2)

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=20)


# ---------------------------------------------------------------- helpers the test modules share

POLL = "0.3"  # seconds between the service's pointer checks


REFUSED = "model not loaded; keeping the serving one"  # the service's log message

# the columns `vae-anomaly score` writes after the id columns, in order
SCORED_COLUMNS = ["score", "is_anomaly", "percentile", "unusual", "error"]


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready records: NaN/None become null (as a client would send them)."""
    out = []
    for rec in df.to_dict(orient="records"):
        out.append(
            {
                k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                for k, v in rec.items()
                if k != "anomaly_kind"
            }
        )
    return out


def v2_body(bundle: Path, rec: dict[str, Any]) -> dict[str, Any]:
    """A V2 infer request for one record: a tensor per feature of ``bundle``'s model."""
    m = read_bundle(bundle).manifest
    types = {"numeric": "FP64", "boolean": "BOOL", "categorical": "BYTES"}
    return {
        "inputs": [
            {"name": f.name, "datatype": types[f.kind], "shape": [1], "data": [rec[f.name]]}
            for f in m.features
        ]
    }


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, /, **labels: str
) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def fresh_registry(src: tuple[Path, str, str], tmp: Path) -> Registry:
    shutil.copytree(src[0], tmp / "registry")
    return Registry(tmp / "registry")


class Load:
    """A steady request load from two client threads, recording every response."""

    def __init__(self, url: str, recs: list[dict[str, Any]], pace: float = 0.0) -> None:
        """``pace``: seconds between a thread's requests (0: back to back)."""
        self.url, self.recs, self.pace = url, recs, pace
        self.results: list[tuple[int, str | None]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(2)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            deadline = time.monotonic() + 120  # bounded, whatever happens
            while not self.stop.wait(self.pace) and time.monotonic() < deadline:
                try:
                    r = c.post("/v1/score", json={"records": self.recs})
                    version = r.json()["model"]["version"] if r.status_code == 200 else None
                    self.results.append((r.status_code, version))
                except httpx.HTTPError:
                    self.results.append((0, None))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def wait_for(self, version: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.results and self.results[-1][1] == version:
                return
            time.sleep(0.05)
        raise AssertionError(f"responses never switched to {version}")


def wait_until(
    cond: Callable[[], Any], what: str, timeout: float = 15.0, every: float = 0.05
) -> None:
    """Poll ``cond`` every ``every`` seconds until it is true; fail naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)


def failures(c: httpx.Client) -> float:
    return value(metric_samples(c), "vae_anomaly_model_reloads_total", result="failure")


def log_entries(server: Server, msg: str) -> list[dict[str, Any]]:
    """The server's JSON log lines whose message is ``msg``."""
    out = []
    for line in server.logs().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == msg:
            out.append(entry)
    return out


# ---------------------------------------------------------------- a headless browser, offline


CHROMIUM = "/usr/bin/chromium"  # Debian's; never `playwright install`


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium through Playwright's sync API: ``with chromium() as browser: ...``.
    (For a page that may only reach 127.0.0.1, use the ``browser_page`` fixture.)"""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


class BrowserPage:
    """A Playwright page whose every request is routed: one to 127.0.0.1 goes through, any
    other is aborted and its URL listed in ``blocked`` (a test asserts it stays empty)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.blocked: list[str] = []
        page.context.route("**/*", self._route)

    def _route(self, route: Any) -> None:
        from urllib.parse import urlsplit

        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()


@pytest.fixture
def browser_page() -> Iterator[BrowserPage]:
    """A fresh headless Chromium page limited to 127.0.0.1 (see :class:`BrowserPage`); tests
    using it start a browser: mark them slow."""
    with chromium() as browser:
        context = browser.new_context()
        try:
            yield BrowserPage(context.new_page())
        finally:
            context.close()


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 900) -> Iterator[tuple[Any, list[str]]]:
    """A page of headless Chromium and the URL of every request it makes (a test asserts they
    all stay on 127.0.0.1)."""
    with chromium() as browser:
        page = browser.new_page(viewport={"width": width, "height": height})
        urls: list[str] = []
        page.on("request", lambda r: urls.append(r.url))
        yield page, urls
