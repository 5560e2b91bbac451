"""The command line's frame: one entry point, training's commands without training installed,
one error base caught once (a bug keeps its traceback), `models` subcommands, a full disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from service import models_cli
from service.api import SchemaError
from service.bulk import BatchError
from service.bundle import BundleError, write_bundle_atomic
from service.cli import TRAINING_COMMANDS, main
from service.errors import DiskFull, MissingExtra, VaeAnomalyError
from service.registry import Registry, RegistryError
from service.settings import SettingsError
from tests.conftest import ROOT
from training.config import ConfigError
from training.data import DataError
from training.demo_data import generate_payments
from training.export import ExportError

TRAIN_HINT = "pip install 'vae-anomaly[train]'"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_entry_point_is_the_services() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"vae-anomaly": "service.cli:main"}


def test_without_training_its_commands_are_listed_and_name_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "training.cli", None)  # `import training.cli` fails
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    listed = capsys.readouterr().out
    for name in TRAINING_COMMANDS:
        assert f"    {name} " in listed and "needs the train extra" in listed, listed
    for argv in (
        ["train", "d.csv", "--out", str(tmp_path / "b"), "--epochs", "3"],
        ["retrain", "new.jsonl", "--registry", str(tmp_path)],
        ["sample-data", "--out", "x.csv"],
        ["demo"],
        ["train", "--help"],
    ):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "", (argv, out)
        want = f"error: `{argv[0]}` needs more than this install (missing training.cli): "
        assert err == f"{want}{TRAIN_HINT}\n", err
    assert not (tmp_path / "b").exists()
    # the service's own commands are untouched, and still refuse unknown flags
    with pytest.raises(SystemExit) as e:
        main(["models", "list", "--registry", str(tmp_path), "--bogus"])
    assert e.value.code == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "blocked,argv,extra",
    [
        ("torch", ["train", "d.csv", "--out", "b"], "train"),
        ("torch", ["demo", "--train-only"], "train"),
        ("pandas", ["score", "model", "d.csv", "--out", "o.csv"], "batch"),
        ("pandas", ["drift", "model", "d.csv"], "batch"),
    ],
)
def test_an_install_without_an_extra_names_it(
    tmp_path: Path, blocked: str, argv: list[str], extra: str
) -> None:
    """A real process in which a dependency of the extra cannot be imported, as after
    `pip install 'vae-anomaly[serve]'`: the service's CLI still starts; the command says what
    to install."""
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "from service.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "VAE_ANOMALY_HOME": str(tmp_path)},  # no demo model there yet
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr == (
        f"error: `{argv[0]}` needs more than this install (missing {blocked}): "
        f"pip install 'vae-anomaly[{extra}]'\n"
    )


@pytest.mark.slow
def test_the_command_line_loads_no_torch_nor_pandas_until_a_command_needs_them() -> None:
    """`serve` and `models` run in the trainer's install too: building the command line must
    not cost them torch's seconds and hundreds of MB."""
    code = (
        "import sys\n"
        "from service.cli import build_parser\n"
        "names = [a.dest for a in build_parser()._subparsers._group_actions[0]._choices_actions]\n"
        "print(names, [m for m in ('torch', 'pandas') if m in sys.modules])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{[*TRAINING_COMMANDS, 'serve', 'score', 'drift', 'models']} []"


def test_a_domain_error_is_one_line_and_its_exit_code(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run(capsys, "models", "show", "--registry", str(tmp_path / "none"))
    assert (code, out) == (2, "")
    assert err == f"error: {tmp_path / 'none'}: not a model registry (no versions/ directory)\n"
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"epochs": 0, "columns": {"t": {"unit": "epoch_us"}}}))
    code, _, err = run(capsys, "train", "d.csv", "--out", str(tmp_path / "b"), "--config", str(bad))
    assert code == 2 and err.startswith("error: config: ") and err.count("\n") == 1, err
    assert "epochs must be >= 1, got 0" in err and "column 't': unit must be" in err
    # too few records to set a threshold from: said before any training, nothing written
    data = tmp_path / "d.csv"
    generate_payments(80, seed=3).to_csv(data, index=False)
    bad.write_text(json.dumps({"calibration_fraction": 0.05, "exclude": ["transaction_id"]}))
    code, _, err = run(
        capsys, "train", str(data), "--out", str(tmp_path / "b"), "--config", str(bad)
    )
    assert code == 2 and err.startswith("error: 4 calibration record(s)"), err
    assert "calibration_fraction" in err and not (tmp_path / "b").exists()


def test_every_domain_error_has_the_one_base() -> None:
    """What main() reports in one line: the errors of bundles, registries, settings, bulk
    scoring, training data, config and export, a full disk, a missing extra."""
    for cls in (BundleError, RegistryError, SettingsError, SchemaError, BatchError):
        assert issubclass(cls, VaeAnomalyError), cls
    for cls in (DataError, ConfigError, ExportError, DiskFull, MissingExtra):
        assert issubclass(cls, VaeAnomalyError), cls


def test_a_bug_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Only a VaeAnomalyError (or an OSError) becomes a one-line exit; anything else is a bug
    and must show where it happened."""
    Registry(tmp_path, create=True)

    def buggy(a: object) -> int:
        raise ValueError("a bug in the command")

    monkeypatch.setattr(models_cli, "cmd_prune", buggy)
    with pytest.raises(ValueError, match="a bug in the command"):
        main(["models", "prune", "--registry", str(tmp_path)])

    class Custom(VaeAnomalyError):
        exit_code = 7

    def refused(a: object) -> int:
        raise Custom("refused, with the reason")

    monkeypatch.setattr(models_cli, "cmd_prune", refused)
    assert run(capsys, "models", "prune", "--registry", str(tmp_path)) == (
        7,
        "",
        "error: refused, with the reason\n",
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["models", "promote", "--registry", "r"],  # promote which version?
        ["models", "list", "--keep", "3", "--registry", "r"],  # --keep is prune's
        ["models", "rollback", "v1", "--registry", "r"],
        ["models", "show"],  # no registry
        ["models"],
    ],
)
def test_models_flags_belong_to_their_action(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vae-anomaly") and "error: " in err, err


@pytest.mark.parametrize(
    "code,room", [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EIO, False)]
)
def test_a_full_disk_is_a_domain_error_and_leaves_nothing(
    tmp_path: Path, code: int, room: bool
) -> None:
    def fill(d: Path) -> None:
        (d / "model.onnx").write_bytes(b"x" * 1000)
        raise OSError(code, os.strerror(code))  # what the next write would raise

    dest = tmp_path / "bundle"
    with pytest.raises(OSError if not room else DiskFull) as e:
        write_bundle_atomic(dest, fill)
    if room:
        assert str(e.value) == (
            f"cannot write the bundle {dest} ({os.strerror(code)}); nothing was written"
        )
        assert isinstance(e.value, VaeAnomalyError) and e.value.exit_code == 2
    else:
        assert not isinstance(e.value, VaeAnomalyError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name,content,says",
    [
        ("d.parquet", b"amount,hour\n1,2\n", "cannot read it as PARQUET: Parquet magic bytes"),
        ("d.csv", b'amount,hour\n"1,2\n', "cannot read it as CSV: Error tokenizing data"),
        ("d.csv", b"amount,hour\n\xff\xfe,1\n", "cannot read it as CSV: 'utf-8' codec"),
    ],
)
@pytest.mark.parametrize("command", ["score", "drift"])
def test_a_file_that_is_not_its_format_is_one_line(
    bundle_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: bytes,
    says: str,
    command: str,
) -> None:
    """The readers' own errors (pandas, pyarrow: ValueErrors) are the file's fault: one line,
    exit 2, nothing written; not a traceback."""
    data = tmp_path / name
    data.write_bytes(content)
    out = ["--out", str(tmp_path / "o.csv"), "--quiet"] if command == "score" else []
    html = ["--html", str(tmp_path / "r.html")] if command == "drift" else []
    code, _, err = run(capsys, command, str(bundle_dir), str(data), *out, *html)
    assert code == 2 and err.startswith(f"error: {data}: {says}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["sample-data", "--out", "x.csv", "--rows", "-5"], "--rows"),  # was a traceback
        (["sample-data", "--out", "x.csv", "--anomalies", "-1"], "--anomalies"),
        (["score", "m", "d.csv", "--out", "o.csv", "--chunk-size", "0"], "--chunk-size"),
        (["score", "m", "d.csv", "--out", "o.csv", "--explain", "-2"], "--explain"),
        (["drift", "m", "d.csv", "--threads", "-1"], "--threads"),
    ],
)
def test_a_count_out_of_range_is_a_usage_error(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"error: argument {flag}: must be at least" in capsys.readouterr().err
