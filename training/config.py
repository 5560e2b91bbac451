"""Every training default in one place. The whole config is saved in the bundle's manifest."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ColumnType = Literal["numeric", "categorical", "boolean", "datetime"]
TRANSFORMS = {"numeric": ("none", "log"), "datetime": ("cyclical", "drop")}


@dataclass
class ColumnConfig:
    type: ColumnType | None = None  # None: inferred from the data
    # numeric: none or log (None: chosen from skewness); datetime: cyclical (time features) or
    # drop (left out of the model)
    transform: Literal["none", "log", "cyclical", "drop"] | None = None
    unit: Literal["iso", "epoch_s", "epoch_ms"] | None = None  # datetime: None = ISO 8601
    timezone: Literal["local", "utc"] | None = None  # datetime: None = local (see timefeatures)

    def check(self, name: str) -> None:
        """Raise ValueError naming the column and the setting that is wrong."""

        def bad(what: str) -> ValueError:
            return ValueError(f"config: column {name!r}: {what}")

        if self.type not in (None, "numeric", "categorical", "boolean", "datetime"):
            raise bad("type must be numeric, categorical, boolean or datetime")
        if self.unit not in (None, "iso", "epoch_s", "epoch_ms"):
            raise bad("unit must be iso, epoch_s or epoch_ms")
        if self.timezone not in (None, "local", "utc"):
            raise bad("timezone must be local or utc")
        if (self.unit or self.timezone) and self.type not in (None, "datetime"):
            raise bad("unit and timezone are for datetime columns")
        if self.transform is None:
            return
        kind = self.type or (
            "datetime"
            if self.unit or self.timezone or self.transform in ("cyclical", "drop")
            else "numeric"
        )
        if self.transform not in TRANSFORMS.get(kind, ()):
            allowed = " or ".join(f"{', '.join(t)} ({k})" for k, t in TRANSFORMS.items())
            raise bad(f"transform {self.transform!r} does not fit; use {allowed}")

    @property
    def datetime(self) -> bool:
        """Configured as a date-time column (by its type, or a date-time setting)."""
        return self.type == "datetime" or bool(
            self.unit or self.timezone or self.transform in ("cyclical", "drop")
        )


@dataclass
class TrainConfig:
    # data
    name: str | None = None  # bundle name; default: the data file's stem
    exclude: list[str] = field(default_factory=list)  # id / timestamp columns to ignore
    label_column: str | None = None  # 0 = normal, 1 = anomaly (kept out of training)
    columns: dict[str, ColumnConfig] = field(default_factory=dict)
    max_categories: int = 100  # most frequent values kept per categorical; the rest -> unknown
    min_category_count: int = 2  # rarer values -> unknown
    # id-like columns are left out of the model (and kept as ids for bulk scoring): integers or
    # strings with at least this share of distinct values ...
    id_distinct_share: float = 0.95
    # ... or strings with more values than max_categories that would put more than this share
    # of the records in the unknown slot
    id_unknown_share: float = 0.1
    validation_fraction: float = 0.1  # early stopping
    calibration_fraction: float = 0.2  # threshold and normal-score distribution
    # model (None = sized from the number of inputs)
    hidden: list[int] | None = None
    latent: int | None = None
    # lower bound of the decoder's std, in robust-scaled units: 0.1 scored better than 0.05 on
    # the ten dev sets, one constant for all (bench/results/quality.md)
    min_std: float = 0.1
    # training
    epochs: int = 200
    patience: int = 15  # epochs without validation improvement before stopping
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-5
    beta: float = 1.0
    beta_warmup_epochs: int = 10
    seed: int = 0
    threads: int | None = None  # torch threads; None = chosen (service/cpus.py)
    # scoring
    samples: int = 16  # L posterior samples (fixed noise) per record in the exported graph
    default_score: Literal["elbo", "recon", "iwae"] = "elbo"
    target_fpr: float = 0.01
    # neighbour term (training/neighbours.py): its weight in the scores (0 = none) and how many
    # training records the graph keeps to measure distances to
    neighbour_weight: float = 2.0
    neighbour_bank: int = 2048

    def validate(self) -> None:
        def bad(what: str) -> ValueError:
            return ValueError(f"config: {what}")

        if not 0 < self.target_fpr < 0.5:
            raise bad(f"target_fpr must be in (0, 0.5), got {self.target_fpr}")
        if not 0 < self.validation_fraction < 0.5 or not 0 < self.calibration_fraction < 0.5:
            raise bad("validation_fraction and calibration_fraction must be in (0, 0.5)")
        if self.validation_fraction + self.calibration_fraction >= 0.8:
            raise bad("validation_fraction + calibration_fraction leaves too little to train on")
        for name, v in (
            ("epochs", self.epochs),
            ("batch_size", self.batch_size),
            ("samples", self.samples),
            ("patience", self.patience),
            ("max_categories", self.max_categories),
        ):
            if v < 1:
                raise bad(f"{name} must be >= 1, got {v}")
        if self.neighbour_weight < 0 or self.neighbour_bank < 1:
            raise bad("neighbour_weight must be >= 0 and neighbour_bank >= 1")
        if self.threads is not None and self.threads < 1:
            raise bad(f"threads must be >= 1, got {self.threads}")
        if self.latent is not None and self.latent < 1:
            raise bad(f"latent must be >= 1, got {self.latent}")
        if self.hidden is not None and (not self.hidden or min(self.hidden) < 1):
            raise bad(f"hidden must be a non-empty list of positive sizes, got {self.hidden}")
        if self.lr <= 0 or self.beta < 0 or self.min_std <= 0:
            raise bad("lr and min_std must be > 0, beta >= 0")
        for name, share in (
            ("id_distinct_share", self.id_distinct_share),
            ("id_unknown_share", self.id_unknown_share),
        ):
            if not 0 < share <= 1:
                raise bad(f"{name} must be in (0, 1], got {share}")
        if self.default_score not in ("elbo", "recon", "iwae"):
            raise bad(f"default_score must be elbo, recon or iwae, got {self.default_score!r}")
        for name, c in self.columns.items():
            c.check(name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _column(name: str, settings: Any) -> ColumnConfig:
    known = [f.name for f in dataclasses.fields(ColumnConfig)]
    if not isinstance(settings, dict) or not set(settings) <= set(known):
        raise ValueError(f"config: column {name!r}: a table of settings among {known}")
    return ColumnConfig(**settings)


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
            raise ValueError(f"config {p}: cannot read it: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"config {p}: must be a table/object of settings")
    if base:
        raw = {**base, **raw, "columns": {**base.get("columns", {}), **raw.get("columns", {})}}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"config: unknown setting(s) {unknown}; known: {sorted(known)}")
    cols = raw.pop("columns", {}) or {}
    try:
        cfg = TrainConfig(**raw, columns={str(k): _column(str(k), v) for k, v in cols.items()})
    except TypeError as e:
        raise ValueError(f"config: {e}") from e
    cfg.validate()
    return cfg
