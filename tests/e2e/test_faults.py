"""Faults, against the real service: the registry becomes unreadable, a bundle file is truncated,
the disk fills up while training writes, a worker is killed under load, SIGTERM arrives during
requests. Each must end with the service answering, no model lost, nothing half-written left
behind, and the fault visible (a log line, a metric, or a non-zero exit with a clear message).

Killing a pointer writer or a training mid-write, and promote/rollback under load, are in
test_lifecycle.py; this file reuses its helpers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from service.bundle import MANIFEST_FILE, MODEL_FILE, read_bundle
from service.registry import POINTER, VERSIONS, Registry, new_version
from tests.conftest import (
    POLL,
    REFUSED,
    Load,
    Server,
    add_version,
    cli_executable,
    failures,
    fresh_registry,
    log_entries,
    records,
    run_main,
    run_server,
    wait_until,
)
from training.demo_data import generate_payments


@pytest.fixture(scope="module")
def registry_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A registry with v1 serving and v2 (v1's model under a newer version) not promoted."""
    tmp = tmp_path_factory.mktemp("faults")
    reg = Registry(tmp / "registry", create=True)
    v1 = add_version(reg, generate_payments(1000, seed=90), promote=True, epochs=3)
    v2 = copy_version(reg, v1, tmp)
    return reg.root, v1, v2


def copy_version(reg: Registry, src: str, tmp: Path) -> str:
    """A new, valid version holding ``src``'s model, entered into the registry by one rename."""
    v = new_version()
    stage = tmp / f"stage-{v}"
    shutil.copytree(reg.version_path(src), stage)
    manifest = json.loads((stage / MANIFEST_FILE).read_text())
    manifest["version"], manifest["parent_version"] = v, src
    (stage / MANIFEST_FILE).write_text(json.dumps(manifest))
    os.rename(stage, reg.version_path(v))
    return v


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def served_under_load(
    reg: Registry, tmp_path: Path, recs: list[dict[str, Any]]
) -> Iterator[tuple[Server, httpx.Client]]:
    """``serve --registry`` with a short poll, a client, and steady scoring traffic."""
    env = {"VAE_ANOMALY_POLL_INTERVAL": POLL}
    with (
        run_server(["serve", "--registry", str(reg.root)], tmp_path, env=env) as s,
        httpx.Client(base_url=s.url, timeout=30) as c,
        Load(s.url, recs, pace=0.02) as load,
    ):
        yield s, c, load


def scores(c: httpx.Client, recs: list[dict[str, Any]]) -> tuple[str, list[float]]:
    """(model version, scores) of one scoring request, which must succeed."""
    r = c.post("/v1/score", json={"records": recs})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["model"]["version"], [x["score"] for x in body["results"]]


def answers(c: httpx.Client, recs: list[dict[str, Any]], version: str, ref: list[float]) -> bool:
    """The service scores ``recs`` with ``version``, as it did before (up to float rounding: a
    request may share an onnxruntime call with others)."""
    got_version, got = scores(c, recs)
    return got_version == version and got == pytest.approx(ref, rel=1e-6)


def registry_entries(reg: Registry) -> tuple[list[str], list[str]]:
    """Every name in the registry's root and in versions/ (hidden ones included)."""
    return sorted(os.listdir(reg.root)), sorted(os.listdir(reg.root / VERSIONS))


def assert_intact(reg: Registry, versions: list[str], serving: str) -> None:
    """No model lost: every version still there and verifying, the pointer valid."""
    assert reg.versions() == versions
    for v in versions:
        assert read_bundle(reg.version_path(v)).manifest.version == v
    assert reg.serving() == serving
    assert reg.read_serving().manifest.version == serving


# Root reads any file whatever its mode, so as root the "service user" is root without the
# capabilities that bypass permission checks (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): dropped
# from the bounding set, they are gone after exec. It still owns, and can run, the venv's Python
# wherever that lives (often under /root). Not root: permissions apply already.
NO_DAC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH\n"
    "    # PR_CAPBSET_READ, PR_CAPBSET_DROP\n"
    "    if libc.prctl(23, cap, 0, 0, 0) == 1 and libc.prctl(24, cap, 0, 0, 0) != 0:\n"
    "        raise OSError(ctypes.get_errno(), 'prctl(PR_CAPBSET_DROP)')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def as_service_user(argv: list[str]) -> list[str]:
    """``argv`` (an executable and its arguments) run subject to file permissions."""
    return [sys.executable, "-c", NO_DAC, *argv] if os.geteuid() == 0 else argv


# Disk full: the file-size limit makes every write past it fail with EFBIG, as ENOSPC would
# (SIGXFSZ ignored, as Python does anyway, so the write fails instead of killing the process).
FSIZE = (
    "import os, resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "n = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def run_with_disk_limit(limit: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", FSIZE, str(limit), cli_executable(), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---------------------------------------------------------------- the registry becomes unreadable


def test_unreadable_registry_keeps_the_model_and_recovers(
    registry_src: tuple[Path, str, str], tmp_path: Path
) -> None:
    _, v1, v2 = registry_src
    reg = fresh_registry(registry_src, tmp_path)
    root, v1_dir = reg.root, reg.version_path(v1)
    recs = records(generate_payments(5, seed=91))
    exe, *args = as_service_user([cli_executable(), "serve", "--registry", str(root)])
    try:
        with (
            run_server(args, tmp_path, env={"VAE_ANOMALY_POLL_INTERVAL": POLL}, exe=exe) as s,
            httpx.Client(base_url=s.url, timeout=30) as c,
            Load(s.url, recs, pace=0.02) as load,
        ):
            version, ref = scores(c, recs)
            assert version == v1
            before = failures(c)

            # 1. the whole registry: the pointer cannot be read
            root.chmod(0o000)
            wait_until(
                lambda: failures(c) > before,
                "a failed reload is counted (can the server still read a mode 000 directory?)",
            )
            assert answers(c, recs, v1, ref)
            if os.geteuid() == 0:
                # the trainer (root: permissions do not stop it) promotes meanwhile; the
                # service cannot see it while the fault lasts
                reg.promote(v2)
            seen = failures(c)
            wait_until(lambda: failures(c) >= seen + 2, "the service keeps trying")
            assert answers(c, recs, v1, ref)
            assert c.get("/readyz").json()["version"] == v1
            reasons = [e.get("reason", "") for e in log_entries(s, REFUSED)]
            assert any("Permission denied" in r and str(root) in r for r in reasons), reasons
            # what an operator sees from the command line, as the service's user
            r = subprocess.run(
                as_service_user([cli_executable(), "models", "list", "--registry", str(root)]),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 2 and "Permission denied" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
            # the fault is removed: the promotion (made meanwhile, if we could) is picked up
            root.chmod(0o755)
            if reg.serving() != v2:
                reg.promote(v2)
            # the pointer the trainer wrote is readable by a service running as another user
            # (mkstemp makes files private)
            assert (root / POINTER).stat().st_mode & 0o444 == 0o444
            load.wait_for(v2)

            # 2. one version's directory: refused while unreadable, loaded once readable
            v1_dir.chmod(0o000)
            seen = failures(c)
            reg.promote(v1, verify=False)  # the trainer checked it; the service cannot read it
            wait_until(lambda: failures(c) > seen, "the unreadable version is refused")
            assert scores(c, recs)[0] == v2
            assert any(
                e.get("wanted") == v1 and "Permission denied" in e.get("reason", "")
                for e in log_entries(s, REFUSED)
            )
            v1_dir.chmod(0o755)
            # an unreadable version is not a bad one: it is tried again at the next poll
            load.wait_for(v1)
            assert answers(c, recs, v1, ref)
    finally:
        root.chmod(0o755)
        v1_dir.chmod(0o755)
    statuses = [st for st, _ in load.results]
    assert len(statuses) > 20 and set(statuses) == {200}, statuses
    assert {v for _, v in load.results} == {v1, v2}
    assert_intact(reg, [v1, v2], v1)
    root_names, _ = registry_entries(reg)
    assert root_names == sorted([".lock", POINTER, VERSIONS])  # no pointer temp file left


# ---------------------------------------------------------------- a bundle file is truncated


def test_truncated_bundle_is_refused_and_the_old_model_keeps_serving(
    registry_src: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, v1, v2 = registry_src
    reg = fresh_registry(registry_src, tmp_path)
    v3 = copy_version(reg, v2, tmp_path)
    model = reg.version_path(v3) / MODEL_FILE
    os.truncate(model, model.stat().st_size // 2)  # e.g. a copy cut short by a full disk
    recs = records(generate_payments(5, seed=92))
    with served_under_load(reg, tmp_path, recs) as (s, c, load):
        _, ref = scores(c, recs)
        before = failures(c)
        # the command line refuses to promote it, and says why
        code, _, err = run_main(capsys, "models", "promote", v3, "--registry", str(reg.root))
        assert code == 2 and "broken, not promoted" in err and "sha256" in err, err
        assert reg.serving() == v1
        # it breaks after promotion (or is promoted by hand): the service refuses it
        reg.promote(v3, verify=False)
        wait_until(lambda: failures(c) > before, "the truncated version is refused")
        assert answers(c, recs, v1, ref)
        assert c.get("/readyz").json()["version"] == v1
        refusals = [e for e in log_entries(s, REFUSED) if e.get("wanted") == v3]
        assert refusals and "sha256" in refusals[0]["reason"], refusals
        # the registry still lists everything, the broken one marked
        code, out, _ = run_main(capsys, "models", "list", "--registry", str(reg.root))
        assert code == 0
        lines = {line.lstrip("* ").split()[0]: line for line in out.splitlines()}
        assert set(lines) == {v1, v2, v3}
        assert "BROKEN" in lines[v3] and "sha256" in lines[v3] and "[serving]" in lines[v3]
        assert "BROKEN" not in lines[v1] + lines[v2]
        # a restart now serves what the running service kept (the newest earlier serving
        # version that loads) and says why, rather than the broken one or nothing
        with (
            run_server(["serve", "--registry", str(reg.root)], tmp_path) as s2,
            httpx.Client(base_url=s2.url, timeout=30) as c2,
        ):
            assert answers(c2, recs, v1, ref)
            assert failures(c2) == 1
        warning = "warning: the serving version cannot be loaded"
        assert any(w.startswith(warning) and "sha256" in w for w in s2.logs().splitlines())
        # roll back, then promote a good version: it is picked up
        code, out, _ = run_main(capsys, "models", "rollback", "--registry", str(reg.root))
        assert code == 0 and v1 in out
        code, _, err = run_main(capsys, "models", "promote", v2, "--registry", str(reg.root))
        assert code == 0, err
        load.wait_for(v2)
        assert answers(c, recs, v2, ref)  # v2 holds v1's model
        # the broken version was refused once, not reloaded at every poll since
        assert failures(c) == before + 1
    statuses = [st for st, _ in load.results]
    assert len(statuses) > 20 and set(statuses) == {200}, statuses
    assert {v for _, v in load.results} == {v1, v2}
    assert reg.versions() == [v1, v2, v3]
    for v in (v1, v2):
        read_bundle(reg.version_path(v))
    assert reg.serving() == v2 and reg.pointer().rollback_target == v1


# ---------------------------------------------------------------- the disk is full


def test_disk_full_while_training_writes_leaves_nothing_and_serving_unchanged(
    registry_src: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, v1, v2 = registry_src
    reg = fresh_registry(registry_src, tmp_path)
    data = tmp_path / "new.csv"
    generate_payments(600, seed=93).to_csv(data, index=False)
    pointer = (reg.root / POINTER).read_bytes()
    entries = registry_entries(reg)
    model_size = (reg.version_path(v1) / MODEL_FILE).stat().st_size
    recs = records(generate_payments(5, seed=94))
    with served_under_load(reg, tmp_path, recs) as (_, c, load):
        _, ref = scores(c, recs)
        before = failures(c)
        answered = len(load.results)
        # a retraining that would promote whatever it wrote (--force), on a disk with room for
        # less than a model
        r = run_with_disk_limit(
            model_size // 4,
            [
                "retrain",
                str(data),
                "--registry",
                str(reg.root),
                "--epochs",
                "2",
                "--quiet",
                "--exclude",
                "transaction_id",
                "--force",
            ],
        )
        assert r.returncode == 2, r.stdout + r.stderr
        assert len(load.results) > answered + 20  # the service answered all along
        assert "Traceback" not in r.stderr
        assert "cannot write the bundle" in r.stderr and "File too large" in r.stderr, r.stderr
        assert "nothing was written" in r.stderr
        assert str(reg.root / VERSIONS) in r.stderr
        # nothing half-written, nothing promoted
        assert registry_entries(reg) == entries
        assert (reg.root / POINTER).read_bytes() == pointer
        # the pointer itself cannot be written either: promote fails and changes nothing
        r = run_with_disk_limit(16, ["models", "promote", v2, "--registry", str(reg.root)])
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "cannot write" in r.stderr and "File too large" in r.stderr, r.stderr
        assert "unchanged" in r.stderr
        assert registry_entries(reg) == entries
        assert (reg.root / POINTER).read_bytes() == pointer
        # the service never noticed: nothing new to load, nothing refused
        assert answers(c, recs, v1, ref)
        assert failures(c) == before
        # the disk has room again: a promotion goes through and is picked up
        code, _, err = run_main(capsys, "models", "promote", v2, "--registry", str(reg.root))
        assert code == 0, err
        load.wait_for(v2)
    statuses = [st for st, _ in load.results]
    assert len(statuses) > 20 and set(statuses) == {200}, statuses
    assert_intact(reg, [v1, v2], v2)


# ---------------------------------------------------------------- a worker is killed under load


def worker_pids(master: int) -> set[int]:
    """uvicorn's live worker processes: the master's children started by multiprocessing spawn
    (its resource tracker is a child too, and a dead worker is a zombie until reaped)."""
    pids = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == master and state != "Z" and b"spawn_main" in cmdline:
            pids.add(int(d.name))
    return pids


def records_scored_by(prom: Path, pid: int) -> float:
    """Records one worker scored, from its own Prometheus multiprocess file."""
    f = prom / f"counter_{pid}.db"
    if not f.exists():
        return 0.0
    return sum(
        sample.value
        for metric in MultiProcessCollector.merge([str(f)])
        for sample in metric.samples
        if sample.name == "vae_anomaly_records_scored_total"
    )


def test_killed_worker_is_replaced_and_the_service_keeps_answering(
    registry_src: tuple[Path, str, str], tmp_path: Path
) -> None:
    _, v1, v2 = registry_src
    reg = fresh_registry(registry_src, tmp_path)
    prom = tmp_path / "prom"
    env = {
        "VAE_ANOMALY_POLL_INTERVAL": POLL,
        "VAE_ANOMALY_WORKERS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
    }
    recs = records(generate_payments(5, seed=95))
    with (
        run_server(["serve", "--registry", str(reg.root)], tmp_path, env=env) as s,
        httpx.Client(base_url=s.url, timeout=30) as c,
    ):
        _, ref = scores(c, recs)

        def on_new_connections_until(cond: Callable[[], bool], what: str) -> None:
            """Score on new connections (each may land on either worker) until ``cond()``."""
            deadline = time.monotonic() + 30
            while not cond():
                assert time.monotonic() < deadline, f"not within 30 s: {what}"
                try:
                    with httpx.Client(base_url=s.url, timeout=30) as fresh:
                        assert answers(fresh, recs, v1, ref)
                except httpx.TransportError:
                    time.sleep(1)
                    assert s.proc.poll() is None, "the server stopped:\n" + s.logs()[-3000:]
                    raise

        def kill_a_worker() -> tuple[int, int]:
            """SIGKILL one worker; wait for uvicorn to start another. (killed, new) pids."""
            workers = worker_pids(s.proc.pid)
            assert len(workers) == 2, workers
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            wait_until(
                lambda: len(worker_pids(s.proc.pid) - {victim}) == 2,
                "uvicorn starts a new worker",
                timeout=30,
            )
            (new,) = worker_pids(s.proc.pid) - workers
            return victim, new

        wait_until(lambda: len(worker_pids(s.proc.pid)) == 2, "two workers")
        workers = worker_pids(s.proc.pid)
        with Load(s.url, recs, pace=0.02) as load:
            on_new_connections_until(
                lambda: all(records_scored_by(prom, p) > 0 for p in workers),
                "both workers serve requests",
            )
            wait_until(lambda: len(load.results) >= 20, "the load is on")
            at_kill = len(load.results)
            victim, new = kill_a_worker()
            # the new worker loads the model and takes connections
            on_new_connections_until(
                lambda: records_scored_by(prom, new) > 0, "the new worker serves requests"
            )
            recovered = len(load.results)
            wait_until(lambda: len(load.results) > recovered + 20, "more requests")
        lost = [r for r in load.results[at_kill:] if r[0] != 200]
        # only the requests in flight on the killed worker may fail (the connection is reset):
        # at most one per load thread; everything before the kill and after the recovery passed
        assert len(lost) <= len(load.threads), lost
        assert {st for st, _ in load.results[:at_kill]} == {200}
        assert {st for st, _ in load.results[recovered:]} == {200}
        assert {v for st, v in load.results if st == 200} == {v1}
        # the fault is visible, and the service is whole again
        assert f"Child process [{victim}] died" in s.logs()
        assert worker_pids(s.proc.pid) == (workers - {victim}) | {new}

        # a worker dies while the pointer names a version both refused (truncated): its
        # replacement serves what they kept, rather than failing its start-up (which makes
        # uvicorn stop every worker, the healthy one too)
        v3 = copy_version(reg, v2, tmp_path)
        model = reg.version_path(v3) / MODEL_FILE
        os.truncate(model, model.stat().st_size // 2)

        def reload_failures() -> float:
            with httpx.Client(base_url=s.url, timeout=30) as fresh:  # c's worker may be gone
                return failures(fresh)

        before = reload_failures()
        reg.promote(v3, verify=False)
        wait_until(
            lambda: reload_failures() >= before + 2, "both workers refuse the broken version"
        )
        _, new = kill_a_worker()
        on_new_connections_until(
            lambda: records_scored_by(prom, new) > 0, "the new worker serves requests"
        )
        assert s.proc.poll() is None
        fallbacks = log_entries(s, "serving an earlier version: the serving one cannot be loaded")
        assert [e["version"] for e in fallbacks] == [v1] and "sha256" in fallbacks[0]["reason"]

        # a promotion reaches every worker (new connections land on either)
        reg.promote(v2)

        def all_on_v2() -> bool:
            for _ in range(10):
                with httpx.Client(base_url=s.url, timeout=30) as fresh:
                    if not answers(fresh, recs, v2, ref):
                        return False
            return True

        wait_until(all_on_v2, "every worker serves v2")
    assert reg.versions() == [v1, v2, v3]
    for v in (v1, v2):
        read_bundle(reg.version_path(v))
    assert reg.read_serving().manifest.version == v2


# ---------------------------------------------------------------- SIGTERM during requests


def test_sigterm_drains_requests_in_flight_then_exits_0(
    registry_src: tuple[Path, str, str], tmp_path: Path
) -> None:
    _, v1, v2 = registry_src
    reg = fresh_registry(registry_src, tmp_path)
    n = 20_000  # records per request: a few tenths of a second of work each
    recs = records(generate_payments(n, seed=96))
    body = json.dumps({"records": recs}).encode()
    env = {"VAE_ANOMALY_POLL_INTERVAL": POLL, "VAE_ANOMALY_MAX_RECORDS": str(n)}
    results: list[tuple[int, str | None, int, list[float]]] = []
    sent = [threading.Event() for _ in range(4)]

    def request(url: str, event: threading.Event) -> None:
        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 1 << 18):
                yield body[i : i + (1 << 18)]
            event.set()  # httpx asks for more only once the last chunk is written

        try:
            r = httpx.post(
                f"{url}/v1/score",
                content=chunks(),
                headers={"content-type": "application/json", "content-length": str(len(body))},
                timeout=60,
            )
            if r.status_code == 200:
                out = r.json()
                got = [x["score"] for x in out["results"]]
                results.append((200, out["model"]["version"], len(got), got[:5]))
            else:
                results.append((r.status_code, None, 0, []))
        except httpx.HTTPError as e:
            results.append((0, repr(e), 0, []))

    with run_server(["serve", "--registry", str(reg.root)], tmp_path, env=env) as s:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            _, ref = scores(c, recs[:5])
        threads = [threading.Thread(target=request, args=(s.url, e)) for e in sent]
        try:
            for t in threads:
                t.start()
            wait_until(lambda: all(e.is_set() for e in sent), "the requests are sent")
            # the event loop has gone round since: every request's headers have been read
            assert httpx.get(f"{s.url}/healthz", timeout=10).status_code == 200
            assert not results, "the requests finished before SIGTERM: make them bigger"
            os.kill(s.proc.pid, signal.SIGTERM)

            def refused() -> bool:
                try:
                    httpx.get(f"{s.url}/healthz", timeout=2)
                except httpx.ConnectError:
                    return True
                except httpx.TransportError:
                    pass  # accepted just before the listener closed, then closed unanswered
                return False

            wait_until(refused, "new connections are refused", timeout=5)
            draining = len(results) < len(threads)
        finally:
            for t in threads:
                t.join(timeout=60)
        assert draining, "every request had finished before the listener closed"
        assert [r[:3] for r in results] == [(200, v1, n)] * len(threads), results
        for r in results:
            assert r[3] == pytest.approx(ref, rel=1e-5)
        assert s.proc.wait(timeout=15) == 0
        logs = s.logs()
        assert "Shutting down" in logs and "Waiting for connections to close" in logs
        assert "Finished server process" in logs and "Cancel" not in logs
    # nothing lost: the registry is as it was, and a new start serves the same model
    assert_intact(reg, [v1, v2], v1)
    with (
        run_server(["serve", "--registry", str(reg.root)], tmp_path) as s2,
        httpx.Client(base_url=s2.url, timeout=30) as c,
    ):
        assert answers(c, recs[:5], v1, ref)
