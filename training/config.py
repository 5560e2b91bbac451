"""Every training default in one place. The whole config is saved in the bundle's manifest."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ColumnType = Literal["numeric", "categorical", "boolean"]


@dataclass
class ColumnConfig:
    type: ColumnType | None = None  # None: inferred from the data
    transform: Literal["none", "log"] | None = None  # numeric only; None: chosen from skewness


@dataclass
class TrainConfig:
    # data
    name: str | None = None  # bundle name; default: the data file's stem
    exclude: list[str] = field(default_factory=list)  # id / timestamp columns to ignore
    label_column: str | None = None  # 0 = normal, 1 = anomaly (kept out of training)
    columns: dict[str, ColumnConfig] = field(default_factory=dict)
    max_categories: int = 100  # most frequent values kept per categorical; the rest -> unknown
    min_category_count: int = 2  # rarer values -> unknown
    validation_fraction: float = 0.1  # early stopping
    calibration_fraction: float = 0.2  # threshold and normal-score distribution
    # model (None = sized from the number of inputs)
    hidden: list[int] | None = None
    latent: int | None = None
    min_std: float = 0.05  # lower bound of the decoder's std, in robust-scaled units
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
        if self.threads is not None and self.threads < 1:
            raise bad(f"threads must be >= 1, got {self.threads}")
        if self.latent is not None and self.latent < 1:
            raise bad(f"latent must be >= 1, got {self.latent}")
        if self.hidden is not None and (not self.hidden or min(self.hidden) < 1):
            raise bad(f"hidden must be a non-empty list of positive sizes, got {self.hidden}")
        if self.lr <= 0 or self.beta < 0 or self.min_std <= 0:
            raise bad("lr and min_std must be > 0, beta >= 0")
        if self.default_score not in ("elbo", "recon", "iwae"):
            raise bad(f"default_score must be elbo, recon or iwae, got {self.default_score!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, **overrides: Any) -> TrainConfig:
    """Read a TOML or JSON config file (any subset of TrainConfig's fields), then apply overrides.

    Columns are a table of per-column settings, e.g. in TOML::

        exclude = ["transaction_id"]
        [columns.hour]
        type = "numeric"
        [columns.amount]
        transform = "log"
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
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"config: unknown setting(s) {unknown}; known: {sorted(known)}")
    cols = raw.pop("columns", {}) or {}
    try:
        columns = {str(k): ColumnConfig(**v) for k, v in cols.items()}
        cfg = TrainConfig(**raw, columns=columns)
    except TypeError as e:
        raise ValueError(f"config: {e}") from e
    for name, c in cfg.columns.items():
        if c.type not in (None, "numeric", "categorical", "boolean"):
            raise ValueError(
                f"config: column {name!r}: type must be numeric, categorical or boolean"
            )
        if c.transform not in (None, "none", "log"):
            raise ValueError(f"config: column {name!r}: transform must be none or log")
    cfg.validate()
    return cfg
