"""The ``vae-anomaly`` command line: anomaly detection for tabular records with a VAE.

One entry point, :func:`main`. The service's commands (serve, score, drift, models) live here;
training adds its own (train, retrain, sample-data, demo: training/cli.py) when it is installed
with the ``train`` extra; without it they are listed all the same and say what to install.
Exit codes (docs/operations.md): 0 done, 2 an error explained in one line (``error: ...``), 3 a
retraining not promoted, 1 a bug (with its traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import importlib.util
import json
import os
import resource
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeAlias

import uvicorn
from pydantic import SecretStr

from service import logs, models_cli
from service.cpus import MAX_THREADS
from service.errors import MissingExtra, VaeAnomalyError
from service.settings import ENV_PREFIX, Settings, SettingsError, load_settings

Command = Callable[[argparse.Namespace], int]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

DESCRIPTION = "Anomaly detection for tabular records with a variational autoencoder."
TRAINING_CLI = "training.cli"  # its register(subparsers) adds training's commands
# The commands training adds, with their help: listed even where training is not installed.
TRAINING_COMMANDS = {
    "train": "fit a model on normal records and write a bundle",
    "retrain": "fit a new version on new normal data; gate; promote",
    "sample-data": "write sample payment records (the demo data)",
    "demo": "serve the demo model (trained on sample data if absent)",
}
# Top-level modules of the optional extras: a command that misses one names its extra.
EXTRA_MODULES = {
    "torch",
    "pandas",
    "pyarrow",
    "onnx",
    "onnxscript",
    "tqdm",
    "matplotlib",
    "sklearn",
}


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port (8000)")
    p.add_argument("--workers", type=int, help="worker processes (1)")
    p.add_argument("--grpc-port", type=int, help="also serve the V2 gRPC API on this port")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low`` (and at most ``high``), else a usage
    error naming the flag."""

    def integer(text: str) -> int:
        n = int(text)  # a ValueError: argparse says "invalid integer value"
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        if high is not None and n > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {n}")
        return n

    return integer


def options(a: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The flags ``names`` (their dests, named as the parameters they become), as keywords."""
    return {n: getattr(a, n) for n in names}


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


def _prometheus_dir(settings: Settings) -> str | None:
    """Several workers share their metrics through files: the folder for them, set in the
    environment before prometheus-client is first imported."""
    if settings.workers <= 1:
        return None
    mp = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="vae-anomaly-prom-")
    Path(mp).mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp
    return mp


def check_start(settings: Settings) -> None:
    """Refuse to start on a broken setting, or with no model that loads, with the reason."""
    # lazy: it imports prometheus-client, which reads PROMETHEUS_MULTIPROC_DIR once, at import
    from service.lifecycle import preflight

    if settings.bundle is None and settings.registry is None:
        raise SettingsError(
            f"no model: give --bundle DIR or --registry DIR (or set {ENV_PREFIX}BUNDLE "
            f"or {ENV_PREFIX}REGISTRY)"
        )
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


def serve(settings: Settings) -> int:
    """Check the bundle, then run uvicorn (blocking) with the settings passed to every worker."""
    mp = _prometheus_dir(settings)
    check_start(settings)
    # workers are separate processes: they read the same settings from the environment
    for name, value in settings.model_dump(exclude_none=True).items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        os.environ[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    if mp is not None:
        for f in glob.glob(os.path.join(mp, "*.db")):  # counters start from zero (the check's too)
            os.unlink(f)
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
    return serve(settings_from_args(a, bundle=a.bundle, registry=a.registry))


def cmd_score(a: argparse.Namespace) -> int:
    if a.engine == "spark":
        return cmd_score_spark(a)
    # lazy: pandas and pyarrow come with the batch extra, not with serve
    from service.api import resolve
    from service.bulk import score_file

    bundle = resolve(a.model)
    flags = options(a, "ids", "score_type", "chunk_size", "threads", "explain")
    s = score_file(bundle, a.data, a.out, progress=not a.quiet, **flags)
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
    try:  # lazy: pyspark is the user's (their cluster's version), not one of our extras
        from service.spark import run_job
    except ImportError as e:
        raise VaeAnomalyError(f"--engine spark needs pyspark ({e})") from e
    rows, anomalies = run_job(
        a.model, str(a.data), str(a.out), master=a.master, score_type=a.score_type
    )
    share = anomalies / rows if rows else 0.0
    print(
        f"scored {rows} records with Spark; {anomalies} anomalies ({share:.2%}); written to {a.out}"
    )
    return 0


def cmd_drift(a: argparse.Namespace) -> int:
    # lazy: pandas comes with the batch extra, not with serve
    from service.api import resolve
    from service.drift_report import DRIFTED, drift_file, verdict, write_html

    bundle = resolve(a.model)
    result = drift_file(bundle, a.data, chunk_size=a.chunk_size, threads=a.threads)
    write_html(result, a.html)
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


def _add_serve(sub: Subparsers) -> None:
    s = sub.add_parser("serve", help="serve a model bundle (or a registry's serving version)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--bundle", type=Path, help="model bundle directory")
    src.add_argument(
        "--registry", type=Path, help="model registry: serve its serving version, follow promotions"
    )
    add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)


def _add_score(sub: Subparsers) -> None:
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
        type=at_least(0),
        default=0,
        metavar="N",
        help="add a top_features column: the N features that drove each score",
    )
    b.add_argument(
        "--id-column",
        dest="ids",
        nargs="+",
        metavar="COL",
        help="columns copied to the output (default: the columns training ignored, "
        "such as ids, that the file has)",
    )
    b.add_argument(
        "--score", dest="score_type", choices=["elbo", "recon", "iwae"], help="score type"
    )
    b.add_argument("--chunk-size", type=at_least(1), default=100_000, help="records per chunk")
    b.add_argument(
        "--threads",
        type=at_least(0, MAX_THREADS),
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
    b.set_defaults(func=cmd_score, extra="batch")


def _add_drift(sub: Subparsers) -> None:
    d = sub.add_parser(
        "drift", help="drift of a file against a model's reference: PSI and KS per feature"
    )
    d.add_argument("model", type=Path, help="a bundle, or a registry (its serving version)")
    d.add_argument("data", type=Path, help="CSV, Parquet or JSON Lines file")
    d.add_argument("--html", type=Path, default=Path("drift-report.html"), help="report to write")
    d.add_argument("--json", action="store_true", help="print the figures as JSON")
    d.add_argument("--chunk-size", type=at_least(1), default=100_000, help="records per chunk")
    d.add_argument(
        "--threads",
        type=at_least(0, MAX_THREADS),
        default=0,
        help="onnxruntime threads (0: all cores)",
    )
    d.set_defaults(func=cmd_drift, extra="batch")


def _needs_train_extra(a: argparse.Namespace) -> int:
    raise MissingExtra(a.command, "train", a.missing)


def add_training_commands(sub: Subparsers) -> None:
    """Training's commands, added by its ``register(subparsers)`` when it can be imported;
    else listed all the same, each saying which extra to install."""
    try:
        # The one place the service side reaches for training, by name so that no service module
        # imports it: training, torch and pandas come with the train extra, not with serve.
        register = importlib.import_module(TRAINING_CLI).register
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in {"training", *EXTRA_MODULES}:
            raise
        for name, text in TRAINING_COMMANDS.items():
            p = sub.add_parser(name, help=f"{text} (needs the train extra)", add_help=False)
            p.set_defaults(func=_needs_train_extra, missing=e.name)  # takes any arguments
        return
    register(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-anomaly", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    add_training_commands(sub)
    _add_serve(sub)
    _add_score(sub)
    _add_drift(sub)
    models_cli.add_models(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; a VaeAnomalyError (or an OSError: a file, a permission, the network)
    ends it with ``error: <message>`` on stderr and the error's exit code."""
    # before torch loads OpenMP: with --threads N > 1, threads that wait at a barrier sleep
    # instead of spinning, which costs little idle and keeps a fit beside busy processes from
    # slowing down many times over (bench/busy_training.py)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.func is not _needs_train_extra:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _run(args)
    except (VaeAnomalyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code if isinstance(e, VaeAnomalyError) else 2


def _run(args: argparse.Namespace) -> int:
    func: Command = args.func
    try:
        return func(args)
    except ModuleNotFoundError as e:  # an optional dependency of this command
        if (e.name or "").split(".")[0] not in EXTRA_MODULES:
            raise
        raise MissingExtra(args.command, getattr(args, "extra", "train"), e.name) from e


if __name__ == "__main__":
    sys.exit(main())
