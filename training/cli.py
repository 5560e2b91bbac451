"""The training commands of ``vae-anomaly`` (train, retrain, sample-data, demo).

service/cli.py owns the command line and calls :func:`register` when training is installed
(with torch: the ``train`` extra).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli import (
    TRAINING_COMMANDS,
    Subparsers,
    add_serve_arguments,
    at_least,
    options,
    serve,
    settings_from_args,
)
from service.errors import VaeAnomalyError
from service.registry import Registry
from training.config import ConfigError, TrainConfig, load_config
from training.summary import summary

if TYPE_CHECKING:
    from training.retrain import Retrained
    from training.train import Result

# Each command imports torch and pandas when it runs, not when the command line is built for
# any command: `serve` or `models list` would wait seconds for torch and hold its ~300 MB.

DEMO_ROWS = 20_000
DEMO_EPOCHS = 60  # enough for the demo's 20,000 records to stop early, in about a minute
# the flags that override a config setting, by the setting's name (each flag's dest)
CONFIG_FLAGS = ("target_fpr", "default_score", "epochs", "seed", "label_column", "name", "threads")
# retrain's gate flags, by its parameters' names
GATE_FLAGS = (
    "warm_start",
    "window",
    "gate_fraction",
    "max_fpr",
    "max_flagged",
    "auc_margin",
    "allow_schema_change",
    "force",
)


def home() -> Path:
    """Where the demo model lives: $VAE_ANOMALY_HOME, else ~/.local/share/vae-anomaly."""
    env = os.environ.get("VAE_ANOMALY_HOME")
    return Path(env) if env else Path.home() / ".local" / "share" / "vae-anomaly"


def _config(a: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    cfg = load_config(a.config, base, **options(a, *CONFIG_FLAGS))
    if a.exclude:
        cfg.exclude = list(dict.fromkeys([*cfg.exclude, *a.exclude]))
    return cfg


def _retrain_config(a: argparse.Namespace, reg: Registry) -> TrainConfig:
    """The serving version's config, with what the flags (and --config) override."""
    from training.retrain import inherited_config  # lazy: torch (see above)

    serving = reg.serving()
    if serving is None:
        return _config(a)
    base = inherited_config(reg.read(serving).manifest)
    if a.name is not None and a.name != base["name"]:
        raise ConfigError(
            f"retrain keeps the model's name ({base['name']!r}); a model named {a.name!r} is "
            f"a new model: vae-anomaly train DATA --registry REGISTRY --name {a.name}"
        )
    return _config(a, base)


def _print_warnings(r: Result) -> None:
    for w in r.warnings:
        print(f"warning: {w}", file=sys.stderr)


def cmd_train(a: argparse.Namespace) -> int:
    from training.data import fingerprint, read_table  # lazy: pandas (see above)
    from training.train import train_bundle  # lazy: torch (see above)

    cfg = _config(a)
    df = read_table(a.data)
    reg = Registry(a.registry, create=True) if a.registry else None
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
    promoted = reg is not None and reg.serving() is None
    if reg is not None and promoted:
        reg.promote(version)  # the registry's first model serves at once
    _print_warnings(r)
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
    from training.retrain import retrain  # lazy: torch (see above)

    reg = Registry(a.registry)
    cfg = _retrain_config(a, reg)
    rt = retrain(a.data, reg, cfg, progress=not a.quiet, **options(a, *GATE_FLAGS))
    if rt.result is not None:
        _print_warnings(rt.result)
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


def _retrain_outcome(a: argparse.Namespace, reg: Registry, rt: Retrained) -> int:
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
    from training.demo_data import generate_payments, labelled  # lazy: pandas (see above)

    df = labelled(a.rows, a.anomalies, a.seed) if a.anomalies else generate_payments(a.rows, a.seed)
    out = Path(a.out)
    if out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    elif out.suffix == ".jsonl":
        df.to_json(out, orient="records", lines=True)
    elif out.suffix == ".csv":
        df.to_csv(out, index=False)
    else:
        raise VaeAnomalyError(f"{out}: use a .csv, .parquet or .jsonl file name")
    print(f"wrote {len(df)} records to {out}")
    return 0


def demo_bundle(progress: bool = True, registry: Path | None = None) -> Path:
    """The demo model's bundle, trained on the sample payments the first time it is asked for
    (in ``registry``, if given: added and promoted when the registry serves nothing yet)."""
    reg = Registry(registry, create=True) if registry else None
    if reg is not None and reg.serving():
        return reg.version_path(reg.serving() or "")
    path = home() / "demo" / "payments"
    if reg is None and (path / "manifest.json").exists():
        if '"explorer"' in (path / "manifest.json").read_text(encoding="utf-8"):
            return path
        print("the demo model predates the explorer: training it again", file=sys.stderr)
    from training.demo_data import generate_payments  # lazy: pandas (see above)
    from training.train import train_bundle  # lazy: torch (see above)

    print(f"training the demo model on {DEMO_ROWS} sample payments (once) ...", file=sys.stderr)
    cfg = TrainConfig(name="demo-payments", exclude=["transaction_id"], epochs=DEMO_EPOCHS)
    r = train_bundle(
        generate_payments(DEMO_ROWS, seed=0),
        reg.version_path if reg else path,
        cfg,
        source="sample-payments",
        data_fingerprint=f"generate_payments(n={DEMO_ROWS}, seed=0)",
        progress=progress,
        overwrite=reg is None,  # an older demo model, without the explorer's files
    )
    if reg is not None:
        reg.promote(r.manifest.version)
    print(summary(r), file=sys.stderr)
    return r.path


def cmd_demo(a: argparse.Namespace) -> int:
    settings_from_args(a)  # a bad setting stops us before any training
    if a.digits and a.registry:
        raise VaeAnomalyError("--digits keeps its model in its own folder; leave out --registry")
    if a.digits:
        from training.digits import digits_bundle  # lazy: torch and scikit-learn (see above)

        path = digits_bundle(home(), progress=not a.quiet)
    else:
        path = demo_bundle(progress=not a.quiet, registry=a.registry)
    source = {"registry": a.registry} if a.registry else {"bundle": path}
    settings = settings_from_args(a, **source)
    if a.train_only:
        print(f"demo model: {path}")
        return 0
    print(
        f"serving the demo model {path} on http://{settings.host}:{settings.port} "
        "(try /explorer and /docs)",
        file=sys.stderr,
    )
    return serve(settings)


def _training_options(t: argparse.ArgumentParser) -> None:
    t.add_argument("--config", type=Path, help="TOML or JSON file of training settings")
    t.add_argument("--target-fpr", type=float, help="false-positive rate of the alarm (0.01)")
    t.add_argument(
        "--score",
        dest="default_score",
        choices=["elbo", "recon", "iwae"],
        help="default score type",
    )
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


def _add_train(sub: Subparsers) -> None:
    t = sub.add_parser("train", help=TRAINING_COMMANDS["train"])
    t.add_argument("data", type=Path, help="CSV, Parquet or JSON Lines file of normal records")
    where = t.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="bundle directory to create")
    where.add_argument("--registry", type=Path, help="model registry to add a version to")
    _training_options(t)
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out bundle")
    t.set_defaults(func=cmd_train)


def _add_retrain(sub: Subparsers) -> None:
    r = sub.add_parser("retrain", help=TRAINING_COMMANDS["retrain"])
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


def register(sub: Subparsers) -> None:
    """Add the training commands to the ``vae-anomaly`` command line."""
    _add_train(sub)
    _add_retrain(sub)
    s = sub.add_parser("sample-data", help=TRAINING_COMMANDS["sample-data"])
    s.add_argument("--out", type=Path, required=True, help=".csv, .parquet or .jsonl file")
    s.add_argument("--rows", type=at_least(0), default=10_000, help="normal records")
    s.add_argument(
        "--anomalies",
        type=at_least(0),
        default=0,
        help="anomalous records to mix in (adds an is_anomaly 0/1 column)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample_data)

    d = sub.add_parser("demo", help=TRAINING_COMMANDS["demo"])
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.add_argument(
        "--registry",
        type=Path,
        help="keep the demo model in this registry (trained there if it serves none)",
    )
    d.add_argument("--train-only", action="store_true", help="train if needed, do not serve")
    d.add_argument(
        "--digits",
        action="store_true",
        help="the 8x8 handwritten digits of scikit-learn instead (a 2-D latent space; see "
        "/explorer)",
    )
    add_serve_arguments(d)
    d.set_defaults(func=cmd_demo)
