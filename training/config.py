"""Every training default in one place. The whole config is saved in the bundle's manifest."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from service.cpus import MAX_THREADS
from service.errors import VaeAnomalyError

ColumnType = Literal["numeric", "categorical", "boolean", "datetime"]
TRANSFORMS = {"numeric": ("none", "log"), "datetime": ("cyclical", "drop")}


class ConfigError(VaeAnomalyError, ValueError):
    """A training setting that is wrong, with a message naming it."""


class ColumnConfig(BaseModel):
    """How to read one column; any setting left out is inferred from the data."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: ColumnType | None = None  # None: inferred from the data
    # numeric: none or log (None: chosen from skewness); datetime: cyclical (time features) or
    # drop (left out of the model)
    transform: Literal["none", "log", "cyclical", "drop"] | None = None
    unit: Literal["iso", "epoch_s", "epoch_ms"] | None = None  # datetime: None = ISO 8601
    timezone: Literal["local", "utc"] | None = None  # datetime: None = local (see timefeatures)

    @model_validator(mode="after")
    def _settings_fit(self) -> ColumnConfig:
        if (self.unit or self.timezone) and self.type not in (None, "datetime"):
            raise ValueError("unit and timezone are for datetime columns")
        if self.transform is not None:
            kind = self.type or ("datetime" if self.datetime else "numeric")
            if self.transform not in TRANSFORMS.get(kind, ()):
                allowed = " or ".join(f"{', '.join(t)} ({k})" for k, t in TRANSFORMS.items())
                raise ValueError(f"transform {self.transform!r} does not fit; use {allowed}")
        return self

    @property
    def datetime(self) -> bool:
        """Configured as a date-time column (by its type, or a date-time setting)."""
        return self.type == "datetime" or bool(
            self.unit or self.timezone or self.transform in ("cyclical", "drop")
        )


Count = Annotated[int, Field(ge=1)]
Share = Annotated[float, Field(gt=0, le=1)]
Fraction = Annotated[float, Field(gt=0, lt=0.5)]


class TrainConfig(BaseModel):
    """Every training setting, validated (on construction and on assignment)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    name: str | None = None  # bundle name; default: the data file's stem
    exclude: list[str] = []  # id / timestamp columns to ignore
    label_column: str | None = None  # 0 = normal, 1 = anomaly (kept out of training)
    columns: dict[str, ColumnConfig] = {}
    max_categories: Count = 100  # most frequent values kept per categorical; the rest -> unknown
    min_category_count: int = 2  # rarer values -> unknown
    # id-like columns are left out of the model (and kept as ids for bulk scoring): integers or
    # strings with at least this share of distinct values ...
    id_distinct_share: Share = 0.95
    # ... or strings with more values than max_categories that would put more than this share
    # of the records in the unknown slot
    id_unknown_share: Share = 0.1
    validation_fraction: Fraction = 0.1  # early stopping
    calibration_fraction: Fraction = 0.2  # threshold and normal-score distribution
    # model (None = sized from the number of inputs)
    hidden: Annotated[list[int] | None, Field(min_length=1)] = None
    latent: Annotated[int | None, Field(ge=1)] = None
    # lower bound of the decoder's std, in robust-scaled units: 0.1 scored better than 0.05 on
    # the ten dev sets, one constant for all (bench/results/quality.md)
    min_std: Annotated[float, Field(gt=0)] = 0.1
    # training
    epochs: Count = 200
    patience: Count = 15  # epochs without validation improvement before stopping
    batch_size: Count = 256
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: float = 1e-5
    beta: Annotated[float, Field(ge=0)] = 1.0
    beta_warmup_epochs: int = 10
    seed: int = 0
    threads: Annotated[int | None, Field(ge=1, le=MAX_THREADS)] = None  # None: service/cpus.py
    # scoring
    samples: Count = 16  # L posterior samples (fixed noise) per record in the exported graph
    default_score: Literal["elbo", "recon", "iwae"] = "elbo"
    target_fpr: Fraction = 0.01
    # the model explorer (training/latent.py): a column kept out of training that only colors
    # the latent map (a digit's class), and [width, height] when the data's feature columns, in
    # order, are the pixels of a grayscale image (drawn as one)
    color_column: str | None = None
    image: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None, min_length=2, max_length=2
    )
    # neighbour term (training/neighbours.py): its weight in the scores (0 = none; split 3:1
    # between the input-space and the latent distance) and how many training records the graph
    # keeps to measure distances to (8192 scored 0.002 above 2048 on the dev sets; each record
    # costs bank x inputs multiply-adds: bench/results/quality.md)
    neighbour_weight: Annotated[float, Field(ge=0)] = 2.0
    neighbour_bank: Count = 8192
    # marginal tail term (training/tails.py; needs the bank, so neighbour_weight > 0): its
    # weight beside the score (0 = none) where it agrees fully with the score on validation
    # records, scaled by that rank correlation (none if negative: training/neighbours.py); it
    # gains on mammography and cardio (where ECOD and IsolationForest led), 2 more than 1 or
    # the fixed 0.5 of before (bench/results/quality.md, round six)
    tail_weight: Annotated[float, Field(ge=0)] = 2.0

    @model_validator(mode="after")
    def _room_to_train(self) -> TrainConfig:
        if self.hidden is not None and min(self.hidden) < 1:
            raise ValueError(f"hidden must be a list of positive sizes, got {self.hidden}")
        if self.validation_fraction + self.calibration_fraction >= 0.8:
            raise ValueError(
                "validation_fraction + calibration_fraction leaves too little to train on"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every setting, as saved in the manifest."""
        return self.model_dump()


def _bound(info: FieldInfo) -> str:
    """A field's allowed range, as ``in (0, 0.5)`` or ``>= 1``."""
    lo = hi = ""
    for m in info.metadata:
        if isinstance(m, at.Gt | at.Ge):
            lo = f"({m.gt}" if isinstance(m, at.Gt) else f"[{m.ge}"
        elif isinstance(m, at.Lt | at.Le):
            hi = f"{m.lt})" if isinstance(m, at.Lt) else f"{m.le}]"
    if lo and hi:
        return f"in {lo}, {hi}"
    return (">" + ("= " if lo[0] == "[" else " ") + lo[1:]) if lo else "<" + hi


def _problem(e: ErrorDetails) -> str:
    """One validation error, in words that name the setting (and the column, for a column's)."""
    loc = [str(x) for x in e["loc"]]
    where = f"column {loc[1]!r}: " if loc[:1] == ["columns"] and len(loc) > 1 else ""
    model: type[BaseModel] = ColumnConfig if where else TrainConfig
    name = loc[2] if where and len(loc) > 2 else (loc[0] if loc and not where else "")
    info = model.model_fields.get(name)
    kind, got = e["type"], e.get("input")
    if kind == "extra_forbidden":
        known = sorted(model.model_fields)
        if where:
            return f"{where}a table of settings among {known}; {name!r} is not one"
        return f"unknown setting {name!r}; known: {known}"
    if kind == "literal_error":
        return f"{where}{name} must be {e['ctx']['expected']}, got {got!r}"
    if info is not None and kind.startswith(("greater_than", "less_than")):
        return f"{where}{name} must be {_bound(info)}, got {got!r}"
    if kind == "model_type" and where:
        return f"{where}a table of settings among {sorted(ColumnConfig.model_fields)}"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{where}{name + ': ' if name else ''}{msg}"


def config_error(e: ValidationError) -> ConfigError:
    return ConfigError("config: " + "; ".join(_problem(x) for x in e.errors()))


def load_config(
    path: str | Path | None, base: dict[str, Any] | None = None, **overrides: Any
) -> TrainConfig:
    """Read a TOML or JSON config file (any subset of TrainConfig's fields), then apply overrides.

    ``base`` (a retrain: the serving version's config) holds the settings the file and the
    overrides start from; per-column settings merge column by column.

    Columns are a table of per-column settings, e.g. in TOML::

        exclude = ["transaction_id"]
        [columns.hour]
        type = "numeric"
        [columns.amount]
        transform = "log"
        [columns.sent_at]
        type = "datetime"
        unit = "epoch_ms"
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
            raw = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"config {p}: cannot read it: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config {p}: must be a table/object of settings")
    if base:
        cols = raw.get("columns", {})  # not a table: validation below says so
        cols = {**base.get("columns", {}), **cols} if isinstance(cols, dict) else cols
        raw = {**base, **raw, "columns": cols}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise config_error(e) from None
