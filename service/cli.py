"""``vae-anomaly serve``: start the scoring service (uvicorn) on a model bundle."""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import os
import resource
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from pydantic import SecretStr

from service.bundle import BundleError, schema_changes
from service.registry import Registry, RegistryError
from service.settings import ENV_PREFIX, Settings, SettingsError, load_settings

WARM_UP_TIMEOUT = 60.0  # seconds: `models promote` stops a model that runs longer


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port (8000)")
    p.add_argument("--workers", type=int, help="worker processes (1)")
    p.add_argument("--grpc-port", type=int, help="also serve the V2 gRPC API on this port")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def settings_from_args(a: argparse.Namespace, **extra: object) -> Settings:
    return load_settings(
        host=a.host,
        port=a.port,
        workers=a.workers,
        grpc_port=a.grpc_port,
        log_level=a.log_level,
        **extra,
    )


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(settings: Settings) -> int:
    """Check the bundle, then run uvicorn (blocking) with the settings passed to every worker."""
    from service.registry import RegistryError

    if settings.bundle is None and settings.registry is None:
        print(
            f"error: no model: give --bundle DIR or --registry DIR (or set {ENV_PREFIX}BUNDLE "
            f"or {ENV_PREFIX}REGISTRY)",
            file=sys.stderr,
        )
        return 2
    mp = None
    if settings.workers > 1:  # before prometheus-client is imported
        mp = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
            prefix="vae-anomaly-prom-"
        )
        Path(mp).mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp
    from service.lifecycle import preflight  # imports prometheus-client

    try:
        # refuse to start on a broken setting, or with no model that loads, with the reason
        version, refused = preflight(settings)
        if refused:
            print(
                f"warning: the serving version cannot be loaded ({refused}); serving {version}, "
                "the newest earlier serving version that loads",
                file=sys.stderr,
            )
        settings.admin_secret()
        settings.api_key_list()
        if settings.grpc_port is not None and importlib.util.find_spec("grpc") is None:
            raise SettingsError("--grpc-port needs the grpc extra: pip install 'vae-anomaly[grpc]'")
    except (BundleError, RegistryError, OSError, SettingsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # workers are separate processes: they read the same settings from the environment
    for name, value in settings.model_dump(exclude_none=True).items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        os.environ[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    if mp is not None:
        for f in glob.glob(os.path.join(mp, "*.db")):  # counters start from zero (the check's too)
            os.unlink(f)
    import uvicorn

    from service import logs

    logs.setup(settings.log_level)
    # One process: once uvicorn has drained on SIGTERM it raises the signal again, and the
    # process would end "killed by SIGTERM" (143) after a clean shutdown. Exit 0, as the
    # several-worker supervisor does. (A SIGTERM before uvicorn takes over exits 0 at once.)
    signal.signal(signal.SIGTERM, _exit_cleanly)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:  # room for max_connections (the workers inherit the limit)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvicorn.run(
        "service.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        # uvloop: with several workers the plain asyncio loop adds ~44 ms per request here
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="service.protocol:GuardedProtocol",  # limits on heads, idle and open connections
        timeout_keep_alive=settings.keepalive_timeout,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(a, bundle=a.bundle, registry=a.registry)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return serve(settings)


def cmd_models(a: argparse.Namespace) -> int:
    """list | show [VERSION] | promote VERSION | rollback | prune --keep N"""
    from service.registry import Registry, RegistryError

    try:
        reg = Registry(a.registry)
        if a.action == "list":
            _list_versions(reg, a.service, a.api_key)
        elif a.action == "show":
            version = a.version or reg.serving()
            if version is None:
                raise RegistryError("no version is serving; name one")
            _show_version(reg, version, a.json)
        elif a.action == "promote":
            if not a.version:
                raise RegistryError("promote which version?")
            refuse_if_it_fails_to_run(reg, a.version)
            p = reg.promote(a.version, allow_schema_change=a.allow_schema_change)
            print(f"serving {p.serving} (rollback would return to {p.rollback_target or '-'})")
        elif a.action == "rollback":
            p = reg.rollback()
            print(f"rolled back: serving {p.serving}")
        elif a.action == "prune":
            removed = reg.prune(a.keep)
            print(
                f"removed {len(removed)} version(s)"
                + (": " + ", ".join(removed) if removed else "")
            )
    except (RegistryError, BundleError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def service_version(url: str, api_key: str | None) -> str:
    """The version a running service loaded (its ``GET /v1/model``)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url.rstrip("/") + "/v1/model")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return str(json.loads(r.read(1 << 20))["version"])
    except urllib.error.HTTPError as e:
        raise OSError(f"{url}: GET /v1/model answered {e.code}") from e
    except (urllib.error.URLError, ValueError, KeyError, TypeError) as e:
        raise OSError(f"{url}: cannot ask the service which model it loaded: {e}") from e


def _list_versions(reg: Registry, service: str | None, api_key: str | None) -> None:
    """One line per version; * marks the pointer's. With a service: what it actually runs, and
    whether it refused the pointer's version (and why, if the features changed)."""
    p = reg.pointer()
    loaded = service_version(service, api_key) if service else None
    versions = reg.versions()
    if not versions:
        print(f"{reg.root}: no versions yet")
    for v in versions:
        marks = []
        if v == p.serving:
            marks.append("serving")
        elif v == p.rollback_target:
            marks.append("rollback target")
        if v == loaded:
            marks.append("loaded by the service")
        elif service and v == p.serving:
            changes = (
                schema_changes(reg.read(loaded).manifest, reg.read(v).manifest)
                if loaded in versions
                else []
            )
            why = (
                f"refused: it changes the features ({'; '.join(changes)})"
                if changes
                else "refused, or not reloaded yet: see its log"
            )
            marks.append(f"NOT LOADED by the service, which runs {loaded}: {why}")
        try:
            m = reg.read(v).manifest
            info = (
                f"{m.name}  created {m.created_at:%Y-%m-%d %H:%M:%S}  "
                f"rows {m.data.rows}  parent {m.parent_version or '-'}"
            )
        except (BundleError, RegistryError) as e:
            info = f"BROKEN: {e}"
        mark = "".join(f"  [{x}]" for x in marks)
        print(f"{'*' if v == p.serving else ' '} {v}  {info}{mark}")


def _show_version(reg: Registry, version: str, raw: bool) -> None:
    import json

    m = reg.read(version).manifest
    gate = reg.gate(version)
    if raw:
        doc = {k: v for k, v in m.model_dump(mode="json").items() if k != "distributions"}
        print(json.dumps({**doc, "gate": gate} if gate else doc, indent=2))
        return
    kinds = ", ".join(
        f"{f.name} ({f.kind}{', nullable' if f.nullable else ''})" for f in m.features
    )
    c = m.config
    lines = [
        f"{m.name} {m.version}" + ("  [serving]" if reg.serving() == version else ""),
        f"created {m.created_at:%Y-%m-%d %H:%M:%S %Z}; parent {m.parent_version or '-'}",
        f"data: {m.data.source}, {m.data.rows} records ({m.data.train_rows} train, "
        f"{m.data.calibration_rows} calibration, {m.data.anomaly_rows} labelled anomalies)",
        f"features: {kinds}",
        f"ignored columns: {', '.join(m.ignored_columns) or '-'}",
        f"config: exclude {c.get('exclude') or '-'}, label {c.get('label_column') or '-'}, "
        f"hidden {c.get('hidden')}, latent {c.get('latent')}, epochs {c.get('epochs')}",
        f"threshold ({m.default_score}) {m.thresholds[m.default_score].value:.4f} "
        f"for a {m.target_fpr:g} false-positive rate",
    ]
    if gate is None:
        lines.append("gate: none (trained with `train`, not `retrain`)")
    else:
        d = gate.get("data", {})
        lines.append(
            f"gate: {'passed' if gate.get('passed') else 'FAILED'}"
            f"{', forced' if gate.get('forced') else ''}; against {gate.get('serving') or '-'} "
            f"on {d.get('held_out_for_gate')} held-out of {d.get('records')} new records"
        )
        lines += [
            f"  [{'pass' if ch.get('passed') else 'FAIL'}] {ch.get('name')}: {ch.get('detail')}"
            for ch in gate.get("checks", [])
        ]
    lines.append(f"more: vae-anomaly models show {version} --json --registry {reg.root}")
    print("\n".join(lines))


def refuse_if_it_fails_to_run(reg: Registry, version: str) -> None:
    """Load and warm up ``version`` as the service would: refuse to promote what every
    worker would refuse."""
    from service.registry import RegistryError
    from service.runtime import check_runs, open_bundle

    try:
        check_runs(*open_bundle(reg.read(version)), timeout=WARM_UP_TIMEOUT)
    except BundleError as e:
        raise RegistryError(f"version {version} is broken, not promoted: {e}") from e


def cmd_score(a: argparse.Namespace) -> int:
    from service.api import resolve
    from service.bulk import BatchError, score_file
    from service.registry import RegistryError

    if a.engine == "spark":
        return cmd_score_spark(a)
    try:
        bundle = resolve(a.model)
        s = score_file(
            bundle,
            a.data,
            a.out,
            ids=a.id_column,
            score_type=a.score,
            chunk_size=a.chunk_size,
            threads=a.threads,
            explain=a.explain,
            progress=not a.quiet,
        )
    except (BatchError, BundleError, RegistryError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = bundle.manifest
    print(
        f"scored {s.rows} records with {m.name} {m.version} in {s.seconds:.1f} s "
        f"({s.rows_per_second:,.0f} rows/s, {s.threads} thread(s)); {s.anomalies} anomalies "
        f"({s.anomalies / s.rows:.2%}); written to {a.out}"
    )
    if s.missing_columns:
        print(f"warning: no column(s) {s.missing_columns}: scored as missing", file=sys.stderr)
    if s.invalid:
        print(
            f"warning: {s.invalid} invalid record(s) not scored (see the 'error' column)",
            file=sys.stderr,
        )
    for col, n in s.unusual.items():
        print(
            f"warning: {n} unusual value(s) in {col!r} (see the 'unusual' column)", file=sys.stderr
        )
    return 0


def cmd_score_spark(a: argparse.Namespace) -> int:
    from service.registry import RegistryError

    try:
        from service.spark import run_job
    except ImportError as e:  # pyspark is the user's, not one of our extras
        print(f"error: --engine spark needs pyspark ({e})", file=sys.stderr)
        return 2
    try:
        rows, anomalies = run_job(
            a.model, str(a.data), str(a.out), master=a.master, score_type=a.score
        )
    except (BundleError, RegistryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    share = anomalies / rows if rows else 0.0
    print(
        f"scored {rows} records with Spark; {anomalies} anomalies ({share:.2%}); written to {a.out}"
    )
    return 0


def cmd_drift(a: argparse.Namespace) -> int:
    import json

    from service.api import resolve
    from service.bulk import BatchError
    from service.drift_report import DRIFTED, drift_file, verdict, write_html
    from service.registry import RegistryError

    try:
        bundle = resolve(a.model)
        result = drift_file(bundle, a.data, chunk_size=a.chunk_size, threads=a.threads)
        write_html(result, a.html)
    except (BatchError, BundleError, RegistryError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(result.as_json(), indent=2))
        return 0
    print(f"{result.records} records against {result.model} {result.version}")
    rows = result.ranked() + ([result.score] if result.score else [])
    width = max(len(d.feature) for d in rows)
    print(f"{'feature':<{width}}  {'PSI':>7}  {'KS':>6}  verdict (PSI > {DRIFTED}: drifted)")
    for d in rows:
        psi = "-" if d.psi is None else f"{d.psi:.4f}"
        ks = "-" if d.ks is None else f"{d.ks:.4f}"
        print(f"{d.feature:<{width}}  {psi:>7}  {ks:>6}  {verdict(d.psi)}")
    print(f"report: {a.html}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="serve a model bundle (or a registry's serving version)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--bundle", type=Path, help="model bundle directory")
    src.add_argument(
        "--registry", type=Path, help="model registry: serve its serving version, follow promotions"
    )
    add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("score", help="score a file of records offline (CSV, Parquet, JSONL)")
    b.add_argument("model", type=Path, help="a bundle, or a registry (its serving version)")
    b.add_argument(
        "data",
        help="CSV, Parquet or JSON Lines: a file, a folder (a partitioned dataset) or a glob "
        "('in/*.parquet', quoted)",
    )
    b.add_argument("--out", type=Path, required=True, help=".csv, .parquet or .jsonl to write")
    b.add_argument(
        "--explain",
        type=int,
        default=0,
        metavar="N",
        help="add a top_features column: the N features that drove each score",
    )
    b.add_argument(
        "--id-column",
        nargs="+",
        metavar="COL",
        help="columns copied to the output (default: the columns training ignored, "
        "such as ids, that the file has)",
    )
    b.add_argument("--score", choices=["elbo", "recon", "iwae"], help="score type")
    b.add_argument("--chunk-size", type=int, default=100_000, help="records per chunk")
    b.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime threads (0: the CPUs this process may use)",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument(
        "--engine",
        choices=["local", "spark"],
        default="local",
        help="local: this process (default); spark: a Spark job (DATA may be a folder or a glob; "
        "--out is a folder of Parquet files; needs pyspark)",
    )
    b.add_argument("--master", help="for --engine spark: the Spark master (default: Spark's)")
    b.set_defaults(func=cmd_score)

    d = sub.add_parser(
        "drift", help="drift of a file against a model's reference: PSI and KS per feature"
    )
    d.add_argument("model", type=Path, help="a bundle, or a registry (its serving version)")
    d.add_argument("data", type=Path, help="CSV, Parquet or JSON Lines file")
    d.add_argument("--html", type=Path, default=Path("drift-report.html"), help="report to write")
    d.add_argument("--json", action="store_true", help="print the figures as JSON")
    d.add_argument("--chunk-size", type=int, default=100_000, help="records per chunk")
    d.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    d.set_defaults(func=cmd_drift)

    m = sub.add_parser("models", help="list, show, promote, roll back or prune registry versions")
    m.add_argument("action", choices=["list", "show", "promote", "rollback", "prune"])
    m.add_argument("version", nargs="?", help="for show (default: serving) and promote")
    m.add_argument("--registry", type=Path, required=True, help="the model registry")
    m.add_argument("--keep", type=int, default=5, help="for prune: versions to keep (5)")
    m.add_argument("--json", action="store_true", help="for show: the whole manifest, as JSON")
    m.add_argument(
        "--service", metavar="URL", help="for list: also show what this running service loaded"
    )
    m.add_argument(
        "--api-key",
        default=os.environ.get("VAE_ANOMALY_API_KEY"),
        help="for list --service: API key, if the service needs one ($VAE_ANOMALY_API_KEY)",
    )
    m.add_argument(
        "--allow-schema-change",
        action="store_true",
        help="for promote: accept a version whose features differ from the serving one's",
    )
    m.set_defaults(func=cmd_models)
