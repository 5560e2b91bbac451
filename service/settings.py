"""The service's settings: one typed object, read once at start from flags and environment.

Every field can be set by an environment variable ``VAE_ANOMALY_<FIELD>`` (e.g.
``VAE_ANOMALY_PORT=9000``); command-line flags win over the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.errors import VaeAnomalyError

ENV_PREFIX = "VAE_ANOMALY_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    bundle: Path | None = Field(None, description="model bundle directory to serve")
    registry: Path | None = Field(None, description="model registry: serve its serving version")
    poll_interval: float = Field(2.0, gt=0, le=3600, description="seconds between pointer checks")
    reload_timeout: float = Field(
        60.0, gt=0, le=3600, description="seconds a model load may take before it is refused"
    )
    allow_schema_change: bool = Field(
        False, description="accept a new version whose features (names, types) differ"
    )
    admin_token: SecretStr | None = Field(None, description="bearer token for /v1/admin/*")
    admin_token_file: Path | None = Field(None, description="file holding the admin token")
    api_keys: SecretStr | None = Field(
        None, description="API keys for scoring, comma-separated (none: scoring is open)"
    )
    api_keys_file: Path | None = Field(None, description="file of API keys, one per line")
    protect_metadata: bool = Field(
        False, description="/metrics, /docs and /openapi.json need an API key too"
    )
    sink_dir: Path | None = Field(None, description="write a sample of scored records here (JSONL)")
    sink_sample: float = Field(
        1.0, gt=0, le=1, description="share of scored records the sink keeps (uniform sample)"
    )
    sink_max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="rotate files at this size")
    sink_keep_files: int = Field(20, ge=1, description="files kept per worker")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    grpc_port: int | None = Field(
        None, ge=1, le=65535, description="also serve the V2 gRPC API on this port (grpc extra)"
    )
    workers: int = Field(1, ge=1, le=64, description="worker processes")
    max_records: int = Field(10_000, ge=1, description="records per request, at most")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="request body size limit")
    request_timeout: float = Field(
        30.0, gt=0, le=3600, description="seconds a request may take before a 503"
    )
    header_timeout: float = Field(
        10.0, gt=0, le=3600, description="seconds a client has to send a request head"
    )
    keepalive_timeout: int = Field(5, ge=1, le=3600, description="seconds an idle connection stays")
    max_connections: int = Field(
        1000, ge=1, description="open connections per worker (at most the open-file limit)"
    )
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="request head size limit")
    max_headers: int = Field(100, ge=8, description="request headers, at most")
    max_string_length: int = Field(256, ge=1, description="longest category string accepted")
    unknown_fields: Literal["reject", "ignore"] = Field(
        "reject", description="what to do with a record field the model does not know"
    )
    explain: int = Field(3, ge=0, description="top features reported per record by default")
    inference_threads: int = Field(1, ge=1, le=64, description="onnxruntime threads per worker")
    batch_max_records: int = Field(
        256, ge=0, description="micro-batching: records per coalesced call (0: off)"
    )
    batch_max_wait_ms: float = Field(
        0.0, ge=0, le=100, description="micro-batching: extra wait for more requests, under load"
    )
    drift_features: str = Field(
        "auto",
        description="features whose drift is tracked: auto (all, at most 64), none, "
        "or a comma-separated list of names",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _one_model_source(self) -> Settings:
        if self.bundle is not None and self.registry is not None:
            raise ValueError("give a bundle or a registry, not both")
        if self.admin_token is not None and self.admin_token_file is not None:
            raise ValueError("give admin_token or admin_token_file, not both")
        if self.api_keys is not None and self.api_keys_file is not None:
            raise ValueError("give api_keys or api_keys_file, not both")
        if self.protect_metadata and self.api_keys is None and self.api_keys_file is None:
            raise ValueError("protect_metadata needs API keys (api_keys or api_keys_file)")
        return self

    def admin_secret(self) -> str | None:
        """The admin token (from the variable or the file); None: admin endpoints are off."""
        if self.admin_token is not None:
            token = self.admin_token.get_secret_value()
        elif self.admin_token_file is not None:
            token = self.admin_token_file.read_text(encoding="utf-8").strip()
        else:
            return None
        return token or None

    def api_key_list(self) -> list[str] | None:
        """The API keys for scoring (from the variable or the file; in the file one per line,
        ``#`` comments and blank lines skipped); None: scoring needs no key."""
        if self.api_keys is not None:
            keys = [k.strip() for k in self.api_keys.get_secret_value().split(",")]
        elif self.api_keys_file is not None:
            lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            keys = [k.strip() for k in lines if not k.strip().startswith("#")]
        else:
            return None
        keys = [k for k in keys if k]
        if not keys:
            raise SettingsError("the API key setting holds no key")
        return keys


class SettingsError(VaeAnomalyError, ValueError):
    """A bad setting, with a message naming it (as its environment variable)."""


def load_settings(**overrides: object) -> Settings:
    """Read the environment, apply non-None overrides (flags), validate; or raise SettingsError."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = ".".join(str(p) for p in err["loc"])
            where = f"{ENV_PREFIX}{name.upper()} ({name})" if name else "settings"
            problems.append(f"{where}: {err['msg']}")
        raise SettingsError("bad setting: " + "; ".join(problems)) from None
