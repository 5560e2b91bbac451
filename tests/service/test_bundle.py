"""The bundle contract (service side): reading, verification, refusal, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from service.bundle import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    BundleError,
    CategoricalFeature,
    read_bundle,
    write_bundle_atomic,
)
from service.features import Percentiles, encode_columns
from service.runtime import open_bundle
from tests.conftest import ROOT
from training.demo_data import generate_payments


def copy_bundle(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_bundle_holds_the_contract_files(bundle_dir: Path) -> None:
    names = {p.name for p in bundle_dir.iterdir()}
    assert {MODEL_FILE, MANIFEST_FILE, "report.html", "loss.png", "scores.png"} <= names
    assert not any(n.endswith(".data") or n.endswith(".pt") or n.endswith(".pkl") for n in names)
    m = read_bundle(bundle_dir).manifest
    assert m.format_version == FORMAT_VERSION
    assert m.name == "payments"
    assert set(m.score_types) == {"elbo", "recon", "iwae"}
    assert m.data.train_rows + m.data.validation_rows + m.data.calibration_rows == m.data.rows
    assert m.model.max_rel_diff < 1e-3
    assert m.config["epochs"] > 0 and m.config["latent"] >= 2
    assert {"torch", "onnxruntime", "numpy"} <= set(m.libraries)
    kinds = {f.name: f.kind for f in m.features}
    assert kinds["amount"] == "numeric" and kinds["card_present"] == "boolean"
    assert kinds["merchant_category"] == "categorical" and "transaction_id" not in kinds
    nullable = {f.name for f in m.features if f.nullable}
    assert {"distance_from_home_km", "customer_age", "device"} <= nullable
    assert "amount" not in nullable


@pytest.mark.slow  # a fresh interpreter: the only way to see what it imports
def test_bundle_loads_and_scores_without_torch(bundle_dir: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from service.features import encode_columns
        from service.runtime import open_bundle
        bundle, model = open_bundle({str(bundle_dir)!r})
        feats = bundle.manifest.features
        cols = {{f.name: [None] * 3 if f.kind != "numeric" else [1.0, 2.0, None] for f in feats}}
        out = model.run(encode_columns(feats, cols).inputs)
        assert np.isfinite(out["elbo"]).all() and out["elbo"].shape == (3,)
        assert "torch" not in sys.modules, "torch was imported"
        assert not any(m == "training" or m.startswith("training.") for m in sys.modules)
        print("ok")
    """)
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_service_code_never_imports_torch_or_training() -> None:
    for path in (ROOT / "service").rglob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            assert not s.startswith(
                ("import torch", "from torch", "import training", "from training")
            ), f"{path}: {s}"


def test_changed_model_file_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle_dir, tmp_path)
    with (b / MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(b)


def test_unknown_format_version_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle_dir, tmp_path)
    raw = json.loads((b / MANIFEST_FILE).read_text())
    raw["format_version"] = FORMAT_VERSION + 1
    (b / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="format version"):
        read_bundle(b)


@pytest.mark.parametrize("damage", ["missing", "not-json", "bad-field", "no-model"])
def test_damaged_bundle_is_refused(bundle_dir: Path, tmp_path: Path, damage: str) -> None:
    b = copy_bundle(bundle_dir, tmp_path)
    if damage == "missing":
        (b / MANIFEST_FILE).unlink()
    elif damage == "not-json":
        (b / MANIFEST_FILE).write_text("{not json")
    elif damage == "bad-field":
        raw = json.loads((b / MANIFEST_FILE).read_text())
        raw["default_score"] = "mahalanobis"
        (b / MANIFEST_FILE).write_text(json.dumps(raw))
    else:
        (b / MODEL_FILE).unlink()
    with pytest.raises(BundleError):
        read_bundle(b)


def test_model_that_onnxruntime_cannot_load_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle_dir, tmp_path)
    (b / MODEL_FILE).write_bytes(b"this is not onnx")
    raw = json.loads((b / MANIFEST_FILE).read_text())
    import hashlib

    raw["model"]["sha256"] = hashlib.sha256(b"this is not onnx").hexdigest()
    (b / MANIFEST_FILE).write_text(json.dumps(raw))
    read_bundle(b)  # the manifest and checksum are fine ...
    with pytest.raises(BundleError, match="onnxruntime cannot load"):
        open_bundle(b)  # ... but the model is not


def test_atomic_write_leaves_nothing_on_error(tmp_path: Path) -> None:
    def fill(d: Path) -> None:
        (d / "model.onnx").write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_bundle_atomic(tmp_path / "b", fill)
    assert list(tmp_path.iterdir()) == []


def test_atomic_overwrite_keeps_old_bundle_on_error(tmp_path: Path) -> None:
    write_bundle_atomic(tmp_path / "b", lambda d: (d / "f").write_text("old"))

    def fail(d: Path) -> None:
        (d / "f").write_text("new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_bundle_atomic(tmp_path / "b", fail, overwrite=True)
    assert (tmp_path / "b" / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    with pytest.raises(BundleError, match="exists"):
        write_bundle_atomic(tmp_path / "b", lambda d: None)
    write_bundle_atomic(tmp_path / "b", lambda d: (d / "f").write_text("new"), overwrite=True)
    assert (tmp_path / "b" / "f").read_text() == "new"
    assert oct((tmp_path / "b").stat().st_mode & 0o777) == oct(0o755)
    assert os.listdir(tmp_path) == ["b"]


def test_unseen_and_missing_categories_are_encoded_and_flagged(bundle_dir: Path) -> None:
    m = read_bundle(bundle_dir).manifest
    cat = next(
        f for f in m.features if isinstance(f, CategoricalFeature) and f.name == "merchant_category"
    )
    df = generate_payments(4, seed=3)
    cols = {f.name: df[f.name].to_numpy() for f in m.features}
    cols["merchant_category"] = np.array(
        ["grocery", "crypto_exchange", None, "<missing>"], dtype=object
    )
    enc = encode_columns(m.features, cols)
    codes = enc.inputs["x_cat"][:, cat.column]
    assert codes[0] == cat.categories.index("grocery")
    assert codes[1] == 0 and codes[2] == 1 and codes[3] == 0
    assert enc.unknown["merchant_category"].tolist() == [False, True, False, True]


def test_percentile_is_monotone_and_bounded(bundle_dir: Path) -> None:
    m = read_bundle(bundle_dir).manifest
    q = np.asarray(m.distributions["elbo"].quantiles)
    scores = np.linspace(q.min() - 10, q.max() + 10, 500)
    percentile = Percentiles(m)
    p = percentile("elbo", scores)
    assert p[0] == 0.0 and p[-1] == 100.0
    assert np.all(np.diff(p) >= 0)
    thr = m.thresholds["elbo"].value
    # the threshold for a 1% false-positive rate sits near the 99th percentile of normal scores
    assert 97.0 <= percentile("elbo", np.array([thr]))[0] <= 100.0


def test_large_inputs_run_in_slices_with_the_same_results(bundle_dir: Path) -> None:
    from service.runtime import MAX_ROWS

    bundle, model = open_bundle(bundle_dir)
    feats = bundle.manifest.features
    df = generate_payments(MAX_ROWS + 1000, seed=4)
    inputs = encode_columns(feats, {f.name: df[f.name].to_numpy() for f in feats}).inputs
    whole = model.run(inputs)
    assert whole["elbo"].shape == (MAX_ROWS + 1000,)
    assert whole["attribution"].shape == (MAX_ROWS + 1000, len(feats))
    tail = model.run({k: v[MAX_ROWS - 10 :] for k, v in inputs.items()})
    np.testing.assert_allclose(whole["iwae"][MAX_ROWS - 10 :], tail["iwae"], rtol=1e-5)
