"""The model bundle: the contract between training (writes it) and the service (reads it).

A bundle is a directory holding exactly:

- ``model.onnx``: the whole scoring computation (preprocessing, encoder, fixed-noise sampling,
  decoder, likelihoods, scores). Inputs ``x_num`` (float32 ``[N, n_num]``, NaN = missing; numeric
  and boolean features) and ``x_cat`` (int64 ``[N, n_cat]``, category indices), each present only
  when the bundle has such features. Outputs one float32 ``[N]`` tensor per score type (``elbo``,
  ``recon``, ``iwae``; higher = more anomalous) and ``attribution`` (float32 ``[N, n_features]``,
  each feature's share of the negative log-likelihood in excess of its median on normal data;
  a row sums to 1, or less when its total excess is below that of 90% of normal records).
- ``manifest.json``: :class:`Manifest`, everything else the service needs (feature schema and
  vocabularies, thresholds, the normal score distribution, metrics, config, sha256 of the model).
- optionally a training report (``report.html`` and PNGs), never read by the service.

Only ONNX and JSON are ever loaded. Bundles are written to a temporary directory beside the
destination and renamed into place, so a reader never sees half a bundle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
ScoreType = Literal["elbo", "recon", "iwae"]
SCORE_TYPES: tuple[ScoreType, ...] = ("elbo", "recon", "iwae")

# Reserved slots at the start of every categorical vocabulary.
UNKNOWN_INDEX = 0
MISSING_INDEX = 1
UNKNOWN_TOKEN = "<unknown>"
MISSING_TOKEN = "<missing>"


class BundleError(Exception):
    """A bundle that cannot be used: missing files, bad manifest, checksum or format mismatch."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumericFeature(_Strict):
    """A real-valued column, scaled robustly: ``((log? x) - center) / scale``."""

    kind: Literal["numeric"] = "numeric"
    name: str
    column: int = Field(ge=0, description="column of x_num")
    nullable: bool = Field(description="missing values were seen in training (and are modelled)")
    transform: Literal["none", "log"] = "none"
    center: float
    scale: float = Field(gt=0)
    impute: float = Field(description="value used for a missing entry, in raw units")
    min: float
    max: float


class BooleanFeature(_Strict):
    """A 0/1 column, Bernoulli likelihood."""

    kind: Literal["boolean"] = "boolean"
    name: str
    column: int = Field(ge=0, description="column of x_num")
    nullable: bool
    rate: float = Field(ge=0, le=1, description="share of 1s in training")


class CategoricalFeature(_Strict):
    """A categorical column; ``categories[0]`` is the unknown slot, ``[1]`` the missing one."""

    kind: Literal["categorical"] = "categorical"
    name: str
    column: int = Field(ge=0, description="column of x_cat")
    nullable: bool
    categories: list[str] = Field(min_length=3)

    @model_validator(mode="after")
    def _reserved(self) -> CategoricalFeature:
        if self.categories[UNKNOWN_INDEX] != UNKNOWN_TOKEN or (
            self.categories[MISSING_INDEX] != MISSING_TOKEN
        ):
            raise ValueError(f"{self.name}: categories must start with the reserved slots")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"{self.name}: duplicate categories")
        return self


Feature = Annotated[
    NumericFeature | BooleanFeature | CategoricalFeature, Field(discriminator="kind")
]

TimeFeature = Literal["hour_sin", "hour_cos", "dow_sin", "dow_cos"]


class DateTimeColumn(_Strict):
    """A date-time field that clients send as it is (an ISO 8601 string, or seconds or
    milliseconds since 1970-01-01 UTC); service/timefeatures.py derives from it the numeric
    features ``<name>.<derived>`` (time of day and day of week on the circle)."""

    name: str
    unit: Literal["iso", "epoch_s", "epoch_ms"]
    timezone: Literal["local", "utc"] = Field(
        "local",
        description="local: the time of day as written (a value's own offset; UTC without "
        "one); utc: a value with an offset is converted to UTC first",
    )
    nullable: bool = Field(description="missing values were seen in training")
    derived: list[TimeFeature] = Field(min_length=1, description="derived features in the model")


class ColumnUse(_Strict):
    """How training used one column of its data (for people; the service does not need it)."""

    name: str
    type: str = Field(description="numeric, boolean, categorical, datetime, id, or - (unread)")
    used: bool
    transform: str = ""
    reason: str = Field("", description="why it was left out, or a note")


class Threshold(_Strict):
    """Alarm thresholds of one score type: a record is an anomaly when ``score > value``."""

    value: float = Field(description="threshold for the target false-positive rate")
    method: str = Field(description="how value was estimated from the calibration scores")
    f1: float | None = Field(None, description="F1-best threshold, when labels were given")


class ScoreDistribution(_Strict):
    """Normal (calibration) scores as quantiles: ``quantiles[i]`` is at ``probs[i]``."""

    probs: list[float]
    quantiles: list[float]

    @model_validator(mode="after")
    def _shape(self) -> ScoreDistribution:
        if len(self.probs) != len(self.quantiles) or len(self.probs) < 2:
            raise ValueError("probs and quantiles must have the same length, at least 2")
        return self


class ModelFile(_Strict):
    file: str = MODEL_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[str]
    outputs: list[str]
    opset: int
    max_abs_diff: float = Field(description="onnxruntime vs torch on validation rows")
    max_rel_diff: float


class DataInfo(_Strict):
    source: str
    fingerprint: str = Field(description="sha256 of the training file")
    rows: int
    train_rows: int
    validation_rows: int
    calibration_rows: int
    anomaly_rows: int = 0


class Manifest(_Strict):
    format_version: int
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    created_at: datetime
    parent_version: str | None = None
    features: list[Feature] = Field(min_length=1)
    ignored_columns: list[str] = Field(
        default_factory=list, description="columns of the training data the model does not use"
    )
    datetime_columns: list[DateTimeColumn] = Field(
        default_factory=list, description="date-time fields the service derives features from"
    )
    columns: list[ColumnUse] = Field(
        default_factory=list, description="every column of the training data and its fate"
    )
    score_types: list[ScoreType] = Field(min_length=1)
    default_score: ScoreType
    target_fpr: float = Field(gt=0, lt=1)
    thresholds: dict[ScoreType, Threshold]
    distributions: dict[ScoreType, ScoreDistribution]
    metrics: dict[str, Any] = Field(description="validation and calibration metrics")
    config: dict[str, Any] = Field(description="the whole training config")
    libraries: dict[str, str]
    data: DataInfo
    model: ModelFile

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.default_score not in self.score_types:
            raise ValueError("default_score must be one of score_types")
        for st in self.score_types:
            if st not in self.thresholds or st not in self.distributions:
                raise ValueError(f"score type {st} needs a threshold and a distribution")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        for inp in ("x_num", "x_cat"):
            cols = sorted(f.column for f in self.features if input_of(f) == inp)
            if cols != list(range(len(cols))):
                raise ValueError(f"{inp} columns must be 0..n-1 without gaps")
        numeric = {f.name for f in self.features if f.kind == "numeric"}
        for c in self.datetime_columns:
            if c.name in names or c.name in self.ignored_columns:
                raise ValueError(f"date-time column {c.name} is also a feature or ignored")
            if not {f"{c.name}.{d}" for d in c.derived} <= numeric:
                raise ValueError(f"date-time column {c.name}: derived features must be numeric")
        return self

    def n_inputs(self, name: str) -> int:
        return sum(1 for f in self.features if input_of(f) == name)


def input_of(feature: NumericFeature | BooleanFeature | CategoricalFeature) -> str:
    return "x_cat" if feature.kind == "categorical" else "x_num"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Bundle:
    """A verified bundle on disk: the manifest and the path of its ONNX model."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model.file


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read and verify a bundle: manifest schema, format version, model checksum."""
    root = Path(path)
    mpath = root / MANIFEST_FILE
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BundleError(f"{root}: no {MANIFEST_FILE}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest: {e}") from e
    if not isinstance(raw, dict):
        raise BundleError(f"{mpath}: manifest is not a JSON object")
    fv = raw.get("format_version")
    if fv != FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: bundle format version {fv!r} is not supported "
            f"(this service reads version {FORMAT_VERSION})"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        raise BundleError(f"{mpath}: invalid manifest: {e}") from e
    model = root / manifest.model.file
    if Path(manifest.model.file).name != manifest.model.file:
        raise BundleError(f"{mpath}: model file must be a plain file name")
    try:
        digest = sha256_file(model)
    except OSError as e:
        raise BundleError(f"{model}: unreadable model file: {e}") from e
    if digest != manifest.model.sha256:
        raise BundleError(
            f"{model}: sha256 {digest} does not match the manifest ({manifest.model.sha256})"
        )
    return Bundle(root, manifest)


def manifest_json(manifest: Manifest) -> str:
    def finite(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(manifest.model_dump(mode="json")), indent=2, allow_nan=False) + "\n"


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bundle_atomic(
    dest: str | os.PathLike[str],
    fill: Callable[[Path], None],
    *,
    overwrite: bool = False,
) -> Path:
    """Create a bundle directory at ``dest`` all at once.

    ``fill(tmp)`` writes the files into a temporary directory beside ``dest``; each is fsynced,
    then the directory is renamed into place. On any error the temporary directory is removed
    and ``dest`` is untouched; a failed write (a full disk) is raised as an OSError naming
    ``dest``.
    """
    dest = Path(dest).absolute()
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest} already exists (choose another path, or overwrite it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be read by the service
    old: Path | None = None
    placed = False
    try:
        fill(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with p.open("rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        placed = True
        fsync_dir(dest.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            os.rename(old, dest)
        if isinstance(e, OSError) and e.errno and e.filename is None and not placed:
            # a failed write (a full disk) names no file: say which bundle, and that it is not there
            raise OSError(
                e.errno, f"cannot write the bundle {dest} ({e.strerror}); nothing was written"
            ) from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest
