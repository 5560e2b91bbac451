"""``vae-anomaly serve``: start the scoring service (uvicorn) on a model bundle."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from pydantic import SecretStr

from service.bundle import BundleError
from service.settings import ENV_PREFIX, Settings, SettingsError, load_settings


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
    from service.registry import Registry, RegistryError
    from service.runtime import open_bundle

    if settings.bundle is None and settings.registry is None:
        print(
            f"error: no model: give --bundle DIR or --registry DIR (or set {ENV_PREFIX}BUNDLE "
            f"or {ENV_PREFIX}REGISTRY)",
            file=sys.stderr,
        )
        return 2
    try:
        # refuse to start on a broken model or setting, with the reason
        if settings.registry is not None:
            open_bundle(Registry(settings.registry).read_serving())
        else:
            assert settings.bundle is not None
            open_bundle(settings.bundle)
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
    if settings.workers > 1:
        mp = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if mp:
            Path(mp).mkdir(parents=True, exist_ok=True)
            for f in glob.glob(os.path.join(mp, "*.db")):  # counters start from zero
                os.unlink(f)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vae-anomaly-prom-")
    import uvicorn

    from service import logs

    logs.setup(settings.log_level)
    # One process: once uvicorn has drained on SIGTERM it raises the signal again, and the
    # process would end "killed by SIGTERM" (143) after a clean shutdown. Exit 0, as the
    # several-worker supervisor does. (A SIGTERM before uvicorn takes over exits 0 at once.)
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        "service.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        # uvloop: with several workers the plain asyncio loop adds ~44 ms per request here
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
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
    import json

    from service.registry import Registry, RegistryError

    try:
        reg = Registry(a.registry)
        if a.action == "list":
            p = reg.pointer()
            versions = reg.versions()
            if not versions:
                print(f"{reg.root}: no versions yet")
            for v in versions:
                mark = (
                    "serving"
                    if v == p.serving
                    else "rollback target"
                    if v == p.rollback_target
                    else ""
                )
                try:
                    m = reg.read(v).manifest
                    info = (
                        f"{m.name}  created {m.created_at:%Y-%m-%d %H:%M:%S}  "
                        f"rows {m.data.rows}  parent {m.parent_version or '-'}"
                    )
                except BundleError as e:
                    info = f"BROKEN: {e}"
                print(
                    f"{'*' if mark == 'serving' else ' '} {v}  {info}"
                    + (f"  [{mark}]" if mark else "")
                )
        elif a.action == "show":
            version = a.version or reg.serving()
            if version is None:
                raise RegistryError("no version is serving; name one")
            m = reg.read(version).manifest
            print(
                json.dumps(
                    {k: v for k, v in m.model_dump(mode="json").items() if k != "distributions"},
                    indent=2,
                )
            )
        elif a.action == "promote":
            if not a.version:
                raise RegistryError("promote which version?")
            p = reg.promote(a.version)
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


def cmd_score(a: argparse.Namespace) -> int:
    from service.batch import BatchError, resolve, score_file
    from service.registry import RegistryError

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
            progress=not a.quiet,
        )
    except (BatchError, BundleError, RegistryError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = bundle.manifest
    print(
        f"scored {s.rows} records with {m.name} {m.version} in {s.seconds:.1f} s "
        f"({s.rows_per_second:,.0f} rows/s); {s.anomalies} anomalies "
        f"({s.anomalies / s.rows:.2%}); written to {a.out}"
    )
    if s.missing_columns:
        print(f"warning: no column(s) {s.missing_columns}: scored as missing", file=sys.stderr)
    for col, n in s.unreadable.items():
        print(f"warning: {n} unreadable value(s) in {col!r} scored as missing", file=sys.stderr)
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
    b.add_argument("data", type=Path, help="CSV, Parquet or JSON Lines file")
    b.add_argument("--out", type=Path, required=True, help=".csv, .parquet or .jsonl to write")
    b.add_argument(
        "--id-column",
        nargs="+",
        metavar="COL",
        help="columns copied to the output (default: the columns training ignored, "
        "such as ids, that the file has)",
    )
    b.add_argument("--score", choices=["elbo", "recon", "iwae"], help="score type")
    b.add_argument("--chunk-size", type=int, default=100_000, help="records per chunk")
    b.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_score)

    m = sub.add_parser("models", help="list, show, promote, roll back or prune registry versions")
    m.add_argument("action", choices=["list", "show", "promote", "rollback", "prune"])
    m.add_argument("version", nargs="?", help="for show (default: serving) and promote")
    m.add_argument("--registry", type=Path, required=True, help="the model registry")
    m.add_argument("--keep", type=int, default=5, help="for prune: versions to keep (5)")
    m.set_defaults(func=cmd_models)
