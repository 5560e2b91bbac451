"""``vae-anomaly models list|show|promote|rollback|prune``: a registry's versions."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from service.bundle import BundleError, schema_changes
from service.registry import Registry, RegistryError
from service.runtime import check_runs, open_bundle

WARM_UP_TIMEOUT = 60.0  # seconds: `models promote` stops a model that runs longer


def service_version(url: str, api_key: str | None) -> str:
    """The version a running service loaded (its ``GET /v1/model``)."""
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


def cmd_list(a: argparse.Namespace) -> int:
    """One line per version; * marks the pointer's. With a service: what it actually runs, and
    whether it refused the pointer's version (and why, if the features changed)."""
    reg = Registry(a.registry)
    p = reg.pointer()
    loaded = service_version(a.service, a.api_key) if a.service else None
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
        elif a.service and v == p.serving:
            marks.append(
                f"NOT LOADED by the service, which runs {loaded}: {_refused(reg, v, loaded)}"
            )
        mark = "".join(f"  [{x}]" for x in marks)
        print(f"{'*' if v == p.serving else ' '} {v}  {_info(reg, v)}{mark}")
    return 0


def _refused(reg: Registry, version: str, loaded: str | None) -> str:
    """Why a service runs ``loaded`` rather than the pointer's ``version``, as far as we know."""
    changes = (
        schema_changes(reg.read(loaded).manifest, reg.read(version).manifest)
        if loaded in reg.versions()
        else []
    )
    if changes:
        return f"refused: it changes the features ({'; '.join(changes)})"
    return "refused, or not reloaded yet: see its log"


def _info(reg: Registry, version: str) -> str:
    try:
        m = reg.read(version).manifest
    except (BundleError, RegistryError) as e:  # one broken version does not hide the others
        return f"BROKEN: {e}"
    return (
        f"{m.name}  created {m.created_at:%Y-%m-%d %H:%M:%S}  "
        f"rows {m.data.rows}  parent {m.parent_version or '-'}"
    )


def cmd_show(a: argparse.Namespace) -> int:
    reg = Registry(a.registry)
    version = a.version or reg.serving()
    if version is None:
        raise RegistryError("no version is serving; name one")
    m = reg.read(version).manifest
    gate = reg.gate(version)
    if a.json:
        doc = {k: v for k, v in m.model_dump(mode="json").items() if k != "distributions"}
        print(json.dumps({**doc, "gate": gate} if gate else doc, indent=2))
        return 0
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
        *_gate_lines(gate),
        f"more: vae-anomaly models show {version} --json --registry {reg.root}",
    ]
    print("\n".join(lines))
    return 0


def _gate_lines(gate: dict[str, object] | None) -> list[str]:
    if gate is None:
        return ["gate: none (trained with `train`, not `retrain`)"]
    d = gate.get("data")
    d = d if isinstance(d, dict) else {}
    checks = gate.get("checks")
    return [
        f"gate: {'passed' if gate.get('passed') else 'FAILED'}"
        f"{', forced' if gate.get('forced') else ''}; against {gate.get('serving') or '-'} "
        f"on {d.get('held_out_for_gate')} held-out of {d.get('records')} new records",
        *(
            f"  [{'pass' if ch.get('passed') else 'FAIL'}] {ch.get('name')}: {ch.get('detail')}"
            for ch in (checks if isinstance(checks, list) else [])
        ),
    ]


def refuse_if_it_fails_to_run(reg: Registry, version: str) -> None:
    """Load and warm up ``version`` as the service would: refuse to promote what every
    worker would refuse."""
    try:
        check_runs(*open_bundle(reg.read(version)), timeout=WARM_UP_TIMEOUT)
    except BundleError as e:
        raise RegistryError(f"version {version} is broken, not promoted: {e}") from e


def cmd_promote(a: argparse.Namespace) -> int:
    reg = Registry(a.registry)
    refuse_if_it_fails_to_run(reg, a.version)
    p = reg.promote(a.version, allow_schema_change=a.allow_schema_change)
    print(f"serving {p.serving} (rollback would return to {p.rollback_target or '-'})")
    return 0


def cmd_rollback(a: argparse.Namespace) -> int:
    p = Registry(a.registry).rollback()
    print(f"rolled back: serving {p.serving}")
    return 0


def cmd_prune(a: argparse.Namespace) -> int:
    removed = Registry(a.registry).prune(a.keep)
    print(f"removed {len(removed)} version(s)" + (": " + ", ".join(removed) if removed else ""))
    return 0


def add_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("models", help="list, show, promote, roll back or prune registry versions")
    actions = m.add_subparsers(dest="action", required=True)
    registry = argparse.ArgumentParser(add_help=False)
    registry.add_argument("--registry", type=Path, required=True, help="the model registry")

    ls = actions.add_parser("list", parents=[registry], help="the versions; * marks the serving")
    ls.add_argument("--service", metavar="URL", help="also show what this running service loaded")
    ls.add_argument(
        "--api-key",
        default=os.environ.get("VAE_ANOMALY_API_KEY"),
        help="for --service: API key, if the service needs one ($VAE_ANOMALY_API_KEY)",
    )
    ls.set_defaults(func=cmd_list)

    show = actions.add_parser("show", parents=[registry], help="one version's model and gate")
    show.add_argument("version", nargs="?", help="default: the serving version")
    show.add_argument("--json", action="store_true", help="the whole manifest, as JSON")
    show.set_defaults(func=cmd_show)

    promote = actions.add_parser("promote", parents=[registry], help="serve this version")
    promote.add_argument("version")
    promote.add_argument(
        "--allow-schema-change",
        action="store_true",
        help="accept a version whose features differ from the serving one's",
    )
    promote.set_defaults(func=cmd_promote)

    back = actions.add_parser(
        "rollback", parents=[registry], help="serve the version served before"
    )
    back.set_defaults(func=cmd_rollback)

    prune = actions.add_parser(
        "prune",
        parents=[registry],
        help="remove all but the newest versions (never the serving or rollback one)",
    )
    prune.add_argument("--keep", type=int, default=5, help="versions to keep (5)")
    prune.set_defaults(func=cmd_prune)
