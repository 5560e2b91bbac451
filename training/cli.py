"""The ``vae-anomaly`` command line.

Torch is imported only by the commands that train, so the service's install (no torch) can run
``serve`` and the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli import add_commands, add_serve_arguments

if TYPE_CHECKING:
    from service.bundle import Manifest
    from service.registry import Registry
    from training.config import TrainConfig
    from training.train import Result

DEMO_ROWS = 20_000


def home() -> Path:
    """Where the demo model lives: $VAE_ANOMALY_HOME, else ~/.local/share/vae-anomaly."""
    env = os.environ.get("VAE_ANOMALY_HOME")
    return Path(env) if env else Path.home() / ".local" / "share" / "vae-anomaly"


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def summary(r: Result) -> str:
    m = r.manifest
    kinds = [f.kind for f in m.features]
    lines = [
        f"bundle: {r.path}",
        f"model: {m.name} version {m.version}",
        f"records: {m.data.rows} read; {m.data.train_rows} train, {m.data.validation_rows} "
        f"validation, {m.data.calibration_rows} calibration, {m.data.anomaly_rows} labelled "
        "anomalies",
        f"features: {len(kinds)} ({kinds.count('numeric')} numeric, {kinds.count('boolean')} "
        f"boolean, {kinds.count('categorical')} categorical)",
        f"epochs: kept {m.metrics['best_epoch']} of {m.metrics['epochs_run']} "
        f"({m.metrics['train_seconds']:.1f} s, {m.metrics['threads']} torch thread(s)); "
        f"validation loss {m.metrics['validation_loss']:.4f}",
        f"thresholds for a {m.target_fpr:g} false-positive rate: "
        + ", ".join(f"{s}={m.thresholds[s].value:.4f}" for s in m.score_types)
        + f" (default score: {m.default_score})",
    ]
    interval = m.thresholds[m.default_score].fpr_interval
    if interval:
        lines.append(
            f"false-positive rate at the {m.default_score} threshold: {interval[0]:.2%} to "
            f"{interval[1]:.2%} (90% interval, from {m.metrics['calibration_scores']} scores)"
        )
    if m.data.anomaly_rows:
        lines.append(
            "on labelled anomalies vs calibration normals: "
            + "; ".join(
                f"{s} ROC-AUC {m.metrics[f'{s}_roc_auc']:.3f} "
                f"AP {m.metrics[f'{s}_average_precision']:.3f}"
                for s in m.score_types
            )
        )
    lines.append(f"onnxruntime vs torch: max relative difference {m.model.max_rel_diff:.1e}")
    lines += column_lines(m)
    lines.append(f"report: {r.path / 'report.html'}")
    return "\n".join(lines)


def column_lines(m: Manifest) -> list[str]:
    """One line per column of the training data: used or left out, its type, how, why."""
    if not m.columns:
        return []
    width = max(len(c.name) for c in m.columns)
    used = sum(c.used for c in m.columns)
    lines = [f"columns: {used} of {len(m.columns)} used"]
    for c in m.columns:
        how = "; ".join(x for x in (c.transform, c.reason) if x)
        lines.append(
            f"  {c.name:<{width}}  {c.type:<11}  {'used' if c.used else 'left out':<8}  {how}"
        )
    return lines


def _config(a: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    from training.config import load_config

    cfg = load_config(
        a.config,
        base,
        target_fpr=a.target_fpr,
        default_score=a.score,
        epochs=a.epochs,
        seed=a.seed,
        label_column=a.label_column,
        name=a.name,
        threads=a.threads,
    )
    if a.exclude:
        cfg.exclude = list(dict.fromkeys([*cfg.exclude, *a.exclude]))
    return cfg


def _retrain_config(a: argparse.Namespace, reg: Registry) -> TrainConfig:
    """The serving version's config, with what the flags (and --config) override."""
    from training.retrain import inherited_config

    serving = reg.serving()
    if serving is None:
        return _config(a)
    base = inherited_config(reg.read(serving).manifest)
    if a.name is not None and a.name != base["name"]:
        raise ValueError(
            f"retrain keeps the model's name ({base['name']!r}); a model named {a.name!r} is "
            f"a new model: vae-anomaly train DATA --registry REGISTRY --name {a.name}"
        )
    return _config(a, base)


def cmd_train(a: argparse.Namespace) -> int:
    from service.bundle import BundleError
    from service.registry import Registry, RegistryError
    from training.data import fingerprint, read_table
    from training.export import ExportError
    from training.train import train_bundle

    try:
        cfg = _config(a)
        df = read_table(a.data)
        reg = Registry(a.registry, create=True) if a.registry else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # third-party chatter; our own notes are returned
            r = train_bundle(
                df,
                reg.version_path if reg else a.out,
                cfg,
                source=str(a.data),
                overwrite=a.overwrite,
                data_fingerprint=fingerprint(a.data),
                progress=not a.quiet,
                parent_version=reg.serving() if reg else None,
            )
        version = r.manifest.version
        promoted = False
        if reg is not None and reg.serving() is None:
            reg.promote(version)  # the registry's first model serves at once
            promoted = True
    except (ValueError, OSError, ExportError, RegistryError, BundleError) as e:
        return _fail(str(e))
    for w in r.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(summary(r))
    if reg is not None:
        print(
            f"registry: {reg.root}: version {version} added"
            + (
                ", now serving (the registry had none)"
                if promoted
                else f"; serve it with: vae-anomaly models promote {version} --registry {reg.root}"
            )
        )
    return 0


def cmd_retrain(a: argparse.Namespace) -> int:
    from service.bundle import BundleError
    from service.registry import Registry, RegistryError
    from training.export import ExportError
    from training.retrain import retrain

    try:
        reg = Registry(a.registry)
        cfg = _retrain_config(a, reg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rt = retrain(
                a.data,
                reg,
                cfg,
                warm_start=a.warm_start,
                window=a.window,
                gate_fraction=a.gate_fraction,
                max_fpr=a.max_fpr,
                max_flagged=a.max_flagged,
                auc_margin=a.auc_margin,
                allow_schema_change=a.allow_schema_change,
                force=a.force,
                progress=not a.quiet,
            )
    except (ValueError, OSError, ExportError, RegistryError, BundleError) as e:
        return _fail(str(e))
    if rt.result is not None:
        for w in rt.result.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(summary(rt.result))
    width = max(len(r[0]) for r in rt.table)
    new = "new " + (rt.version or "-")
    print(f"\n{'':{width}}  {'serving ' + (rt.parent or '-'):>34}  {new:>34}")
    for measure, old, value in rt.table:
        print(f"{measure:{width}}  {old:>34}  {value:>34}")
    print("\ngate:")
    for c in rt.checks:
        print(f"  [{'pass' if c.passed else 'FAIL'}] {c.name}: {c.detail}")
    return _retrain_outcome(a, reg, rt)


def _retrain_outcome(a: argparse.Namespace, reg: Registry, rt: Any) -> int:
    if rt.version is None:
        print(
            "not retrained: the serving model flags this data far above its target rate; it "
            "does not look like normal traffic (anomalies among it, an incident, or a large "
            "drift). Look at it; retrain on it anyway with --force"
        )
        return 3
    if rt.promoted:
        why = "gate passed" if rt.passed else ("forced" if a.force else "no serving version")
        print(
            f"promoted {rt.version} ({why}); roll back with: vae-anomaly models rollback "
            f"--registry {reg.root}"
        )
        return 0
    if rt.schema_changes:
        print(
            f"not promoted: {rt.version} changes the features clients send "
            f"({'; '.join(rt.schema_changes)}); a service refuses such a version. It stays in "
            "the registry; promote it with --allow-schema-change, or train a new model with "
            "`vae-anomaly train`"
        )
        return 3
    print(
        f"not promoted: the gate failed; {rt.version} stays in the registry "
        "(promote it anyway with --force or `vae-anomaly models promote`)"
    )
    return 3


def cmd_sample_data(a: argparse.Namespace) -> int:
    from training.demo_data import generate_payments, labelled

    df = labelled(a.rows, a.anomalies, a.seed) if a.anomalies else generate_payments(a.rows, a.seed)
    out = Path(a.out)
    if out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    elif out.suffix == ".jsonl":
        df.to_json(out, orient="records", lines=True)
    elif out.suffix == ".csv":
        df.to_csv(out, index=False)
    else:
        return _fail(f"{out}: use a .csv, .parquet or .jsonl file name")
    print(f"wrote {len(df)} records to {out}")
    return 0


def demo_bundle(progress: bool = True, registry: Path | None = None) -> Path:
    """The demo model's bundle, trained on the sample payments the first time it is asked for
    (in ``registry``, if given: added and promoted when the registry serves nothing yet)."""
    from service.registry import Registry

    reg = Registry(registry, create=True) if registry else None
    if reg is not None and reg.serving():
        return reg.version_path(reg.serving() or "")
    path = home() / "demo" / "payments"
    if reg is None and (path / "manifest.json").exists():
        return path
    from training.config import TrainConfig
    from training.demo_data import generate_payments
    from training.train import train_bundle

    print(f"training the demo model on {DEMO_ROWS} sample payments (once) ...", file=sys.stderr)
    cfg = TrainConfig(name="demo-payments", exclude=["transaction_id"], epochs=60)
    r = train_bundle(
        generate_payments(DEMO_ROWS, seed=0),
        reg.version_path if reg else path,
        cfg,
        source="sample-payments",
        data_fingerprint=f"generate_payments(n={DEMO_ROWS}, seed=0)",
        progress=progress,
    )
    if reg is not None:
        reg.promote(r.manifest.version)
    print(summary(r), file=sys.stderr)
    return r.path


def cmd_demo(a: argparse.Namespace) -> int:
    from service.cli import serve, settings_from_args
    from service.registry import RegistryError
    from service.settings import SettingsError

    try:
        settings_from_args(a)  # a bad setting stops us before any training
        path = demo_bundle(progress=not a.quiet, registry=a.registry)
        settings = (
            settings_from_args(a, registry=a.registry)
            if a.registry
            else settings_from_args(a, bundle=path)
        )
    except (SettingsError, RegistryError, OSError) as e:
        return _fail(str(e))
    if a.train_only:
        print(f"demo model: {path}")
        return 0
    print(
        f"serving the demo model {path} on http://{settings.host}:{settings.port} (try /docs)",
        file=sys.stderr,
    )
    return serve(settings)


def _training_options(t: argparse.ArgumentParser) -> None:
    t.add_argument("--config", type=Path, help="TOML or JSON file of training settings")
    t.add_argument("--target-fpr", type=float, help="false-positive rate of the alarm (0.01)")
    t.add_argument("--score", choices=["elbo", "recon", "iwae"], help="default score type")
    t.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    t.add_argument("--seed", type=int, help="random seed (same seed, same model)")
    t.add_argument("--exclude", nargs="+", metavar="COL", help="columns to ignore (ids, times)")
    t.add_argument(
        "--label-column",
        metavar="COL",
        help="0/1 column; rows with 1 are kept out of training and used to evaluate",
    )
    t.add_argument("--name", help="model name (train: default the data file's name; retrain: kept)")
    t.add_argument(
        "--threads",
        type=int,
        help="torch threads (default 1: more only help large models beside busy processes; "
        "see README, Threads)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-anomaly", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fit a model on normal records and write a bundle")
    t.add_argument("data", type=Path, help="CSV, Parquet or JSON Lines file of normal records")
    where = t.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="bundle directory to create")
    where.add_argument("--registry", type=Path, help="model registry to add a version to")
    _training_options(t)
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out bundle")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("retrain", help="fit a new version on new normal data; gate; promote")
    r.add_argument(
        "data",
        type=Path,
        help="new normal records: a file, or a folder of .jsonl (the service's sink)",
    )
    r.add_argument("--registry", type=Path, required=True, help="the model registry")
    r.add_argument(
        "--warm-start", action="store_true", help="start from the serving version's weights"
    )
    r.add_argument("--window", type=int, metavar="N", help="use only the last N records")
    r.add_argument(
        "--gate-fraction",
        type=float,
        default=0.2,
        help="share of the new normal records held out for the gate (0.2)",
    )
    r.add_argument(
        "--max-fpr",
        type=float,
        help="highest false-positive rate the gate accepts (default: about 2x target)",
    )
    r.add_argument(
        "--auc-margin",
        type=float,
        default=0.02,
        help="how much lower than the serving model's the ROC-AUC may be (0.02)",
    )
    r.add_argument(
        "--max-flagged",
        type=float,
        metavar="SHARE",
        help="unlabelled data: most of it the serving model may flag (default: 3x its target)",
    )
    r.add_argument(
        "--allow-schema-change",
        action="store_true",
        help="promote a version whose features differ from the serving one's",
    )
    r.add_argument(
        "--force",
        action="store_true",
        help="train on data the serving model flags too often; promote even if the gate fails",
    )
    _training_options(r)
    r.set_defaults(func=cmd_retrain)

    s = sub.add_parser("sample-data", help="write sample payment records (the demo data)")
    s.add_argument("--out", type=Path, required=True, help=".csv, .parquet or .jsonl file")
    s.add_argument("--rows", type=int, default=10_000, help="normal records")
    s.add_argument(
        "--anomalies",
        type=int,
        default=0,
        help="anomalous records to mix in (adds an is_anomaly 0/1 column)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample_data)

    d = sub.add_parser("demo", help="serve the demo model (trained on sample data if absent)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.add_argument(
        "--registry",
        type=Path,
        help="keep the demo model in this registry (trained there if it serves none)",
    )
    d.add_argument("--train-only", action="store_true", help="train if needed, do not serve")
    add_serve_arguments(d)
    d.set_defaults(func=cmd_demo)

    add_commands(sub)
    return p


TRAIN_ONLY = {"torch", "pandas", "pyarrow", "onnx", "onnxscript", "tqdm", "matplotlib"}


def main(argv: list[str] | None = None) -> int:
    # before torch loads OpenMP: with --threads N > 1, threads that wait at a barrier sleep
    # instead of spinning, which costs little idle and keeps a fit beside busy processes from
    # slowing down many times over (bench/busy_training.py)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ModuleNotFoundError as e:
        if e.name not in TRAIN_ONLY:
            raise
        extra = "batch" if args.command == "score" else "train"
        return _fail(
            f"`{args.command}` needs more than the service install (missing {e.name}): "
            f"pip install 'vae-anomaly[{extra}]'"
        )


if __name__ == "__main__":
    sys.exit(main())
