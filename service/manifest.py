"""The bundle's manifest (``manifest.json``): its schema, checked when read, and its JSON.

Everything about a model the service needs besides the ONNX graph: the feature schema and
vocabularies, thresholds, the normal score distribution, metrics, config, the model's sha256.
Reading and writing whole bundles is :mod:`service.bundle`, which re-exports these names.
"""

from __future__ import annotations

import itertools
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import VaeAnomalyError
from service.latent_manifest import Explorer

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
MAX_JSON_DEPTH = 32  # the manifest nests 5 levels; pydantic and json recurse per level


class BundleError(VaeAnomalyError):
    """A bundle that cannot be used: missing files, bad manifest, checksum or format mismatch."""


class _Strict(BaseModel):
    # every float field finite: a NaN threshold would never alarm, a NaN scale scores all as NaN
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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

    @model_validator(mode="after")
    def _range(self) -> NumericFeature:
        if self.min > self.max:
            raise ValueError(f"{self.name}: min {self.min} is above max {self.max}")
        return self


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
    unseen_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of held-out normal records whose value is not in the vocabulary",
    )

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
    fpr_interval: tuple[float, float] | None = Field(
        None, description="90% interval of the false-positive rate at value (absent: older bundle)"
    )


class ScoreDistribution(_Strict):
    """Normal (calibration) scores as quantiles: ``quantiles[i]`` is at ``probs[i]``."""

    probs: list[float]
    quantiles: list[float]

    @model_validator(mode="after")
    def _shape(self) -> ScoreDistribution:
        if len(self.probs) != len(self.quantiles) or len(self.probs) < 2:
            raise ValueError("probs and quantiles must have the same length, at least 2")
        if not all(0 <= p <= 1 for p in self.probs):
            raise ValueError("probs must lie in [0, 1]")
        for name, xs in (("probs", self.probs), ("quantiles", self.quantiles)):
            if any(b < a for a, b in itertools.pairwise(xs)):
                raise ValueError(f"{name} must be non-decreasing")
        return self


class BucketReference(_Strict):
    """Drift reference of one feature (or of the default score): its buckets and the share of
    the calibration records in each. Numeric and boolean values (and scores) fall in bucket
    ``i`` when ``edges[i-1] < x <= edges[i]``, then features have a ``<missing>`` bucket;
    a categorical value's bucket is ``index[category index]``. Summaries only, no records."""

    name: str
    buckets: list[str] = Field(min_length=1)
    expected: list[float] = Field(description="share of the calibration records in each bucket")
    edges: list[float] = Field(default_factory=list)
    index: list[int] = Field(default_factory=list)
    ks_values: list[float] = Field(
        default_factory=list, description="numeric: grid of values where the CDF is known"
    )
    ks_cdf: list[float] = Field(
        default_factory=list, description="share of present calibration values <= each"
    )

    @model_validator(mode="after")
    def _shape(self) -> BucketReference:
        if len(self.expected) != len(self.buckets) or len(set(self.buckets)) != len(self.buckets):
            raise ValueError(f"{self.name}: one expected share per bucket, unique buckets")
        if any(i < 0 or i >= len(self.buckets) for i in self.index):
            raise ValueError(f"{self.name}: bucket index out of range")
        if len(self.ks_values) != len(self.ks_cdf):
            raise ValueError(f"{self.name}: ks_values and ks_cdf differ in length")
        return self


class Reference(_Strict):
    """What drift is measured against: the calibration records, bucketed (optional in a
    manifest: a bundle without it is served with no drift tracking)."""

    rows: int = Field(ge=1, description="calibration records summarised")
    features: list[BucketReference]
    score: BucketReference = Field(description="the default score, by calibration deciles")


class ModelFile(_Strict):
    file: str = MODEL_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[str]
    outputs: list[str]
    opset: int = Field(ge=1)
    max_abs_diff: float = Field(ge=0, description="onnxruntime vs torch on validation rows")
    max_rel_diff: float = Field(ge=0)


class DataInfo(_Strict):
    source: str
    fingerprint: str = Field(description="sha256 of the training file")
    rows: int = Field(ge=0)
    train_rows: int = Field(ge=0)
    validation_rows: int = Field(ge=0)
    calibration_rows: int = Field(ge=0)
    anomaly_rows: int = Field(0, ge=0)


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
    reference: Reference | None = None
    explorer: Explorer | None = None  # the latent-space files and map (service/latent.py)

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


def schema_changes(old: Manifest, new: Manifest) -> list[str]:
    """How the records clients send to ``old`` would fare with ``new``, one line per change:
    features added (clients do not send them) or removed, a kind changed, or a feature that may
    no longer be missing. Empty when clients are unaffected (a feature that may now be missing,
    new categories, thresholds and scaling are not changes to them). The one definition used
    by the service (reload), the registry (promote) and the retrain gate."""
    before, after = client_fields(old), client_fields(new)
    out = [f"added {n!r} ({after[n][0]})" for n in after if n not in before]
    out += [f"removed {n!r} ({before[n][0]})" for n in before if n not in after]
    for n in sorted(before.keys() & after.keys()):
        (kind_a, nullable_a), (kind_b, nullable_b) = before[n], after[n]
        if kind_a != kind_b:
            out.append(f"retyped {n!r} ({kind_a} -> {kind_b})")
        elif nullable_a and not nullable_b:
            out.append(f"{n!r} may no longer be missing")
    return out


def time_feature_name(column: str, derived: str) -> str:
    """The name of a feature derived from a date-time field (service/timefeatures.py)."""
    return f"{column}.{derived}"


def client_fields(m: Manifest) -> dict[str, tuple[str, bool]]:
    """The fields clients send, with their kind and whether they may be missing: a date-time
    field (with its unit) in place of the time features derived from it."""
    derived = {time_feature_name(c.name, d) for c in m.datetime_columns for d in c.derived}
    out: dict[str, tuple[str, bool]] = {
        f.name: (f.kind, f.nullable) for f in m.features if f.name not in derived
    }
    out.update({c.name: (f"datetime {c.unit}", c.nullable) for c in m.datetime_columns})
    return out


def parse_manifest(mpath: Path, raw: Any) -> Manifest:
    """Validate a manifest read from ``mpath`` (BundleError with every problem on one line)."""
    if not isinstance(raw, dict):
        raise BundleError(f"{mpath}: manifest is not a JSON object")
    _check_json(mpath, raw)
    fv = raw.get("format_version")
    if fv != FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: bundle format version {fv!r} is not supported "
            f"(this service reads version {FORMAT_VERSION})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}"
            for err in e.errors(include_url=False)
        )
        raise BundleError(f"{mpath}: invalid manifest: {problems}") from None


def _check_json(mpath: Path, raw: Any) -> None:
    """Every number finite and nesting at most MAX_JSON_DEPTH levels, anywhere (free-form
    sections included), checked with an explicit stack rather than recursion."""
    stack: list[tuple[Any, str, int]] = [(raw, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise BundleError(f"{mpath}: {where} nests more than {MAX_JSON_DEPTH} levels deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in items)
        elif isinstance(value, float) and not math.isfinite(value):
            raise BundleError(f"{mpath}: {where} is {value}, not a finite number")


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
