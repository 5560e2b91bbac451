"""The registry (service/registry.py): versions, promotion, rollback, pruning, and the
`vae-anomaly models` commands over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.bundle import MODEL_FILE
from service.registry import Registry, RegistryError, new_version
from tests.conftest import fresh_registry, run_main
from training.data import fingerprint
from training.demo_data import generate_payments


@pytest.mark.slow  # trains three models
def test_registry_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "pay.csv"
    generate_payments(800, seed=62).to_csv(data, index=False)
    reg_dir = str(tmp_path / "reg")
    args = ["--epochs", "3", "--quiet", "--exclude", "transaction_id"]
    code, out, _ = run_main(capsys, "train", str(data), "--registry", reg_dir, *args)
    assert code == 0 and "now serving" in out
    reg = Registry(reg_dir)
    (v1,) = reg.versions()
    assert reg.serving() == v1
    versions = [v1]
    for _ in range(2):
        code, out, _ = run_main(capsys, "train", str(data), "--registry", reg_dir, *args)
        assert code == 0 and "models promote" in out
        versions = reg.versions()
    v1, v2, v3 = versions
    assert reg.serving() == v1  # adding a version does not promote it
    m2 = reg.read(v2).manifest
    assert m2.parent_version == v1 and m2.version == v2
    assert m2.data.fingerprint == fingerprint(data) and m2.data.rows == 800

    code, out, _ = run_main(capsys, "models", "list", "--registry", reg_dir)
    assert code == 0 and out.count("\n") == 3 and f"* {v1}" in out
    assert run_main(capsys, "models", "promote", v3, "--registry", reg_dir)[0] == 0
    assert reg.serving() == v3 and reg.pointer().rollback_target == v1
    code, out, _ = run_main(capsys, "models", "show", "--json", "--registry", reg_dir)
    assert code == 0 and json.loads(out)["version"] == v3
    # prune keeps the serving version and the rollback target, whatever their age
    code, out, _ = run_main(capsys, "models", "prune", "--keep", "1", "--registry", reg_dir)
    assert code == 0 and reg.versions() == [v1, v3]
    assert run_main(capsys, "models", "rollback", "--registry", reg_dir)[0] == 0
    assert reg.serving() == v1
    code, _, err = run_main(capsys, "models", "rollback", "--registry", reg_dir)
    assert code != 0 and "nothing to roll back" in err
    code, _, err = run_main(capsys, "models", "promote", "nope", "--registry", reg_dir)
    assert code != 0 and "nope" in err


def test_versions_are_unique_and_ordered() -> None:
    vs = [new_version() for _ in range(2000)]
    assert len(set(vs)) == len(vs)
    assert vs == sorted(vs)


@pytest.mark.slow  # its registry trains two models
def test_promote_refuses_a_broken_version(
    two_versions: tuple[Path, str, str], tmp_path: Path
) -> None:
    reg = fresh_registry(two_versions, tmp_path)
    _, v1, v2 = two_versions
    with (reg.version_path(v2) / MODEL_FILE).open("ab") as f:
        f.write(b"x")
    with pytest.raises(RegistryError, match="broken"):
        reg.promote(v2)
    assert reg.serving() == v1
