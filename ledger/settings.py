"""The one typed settings object. Nothing else in the project reads ``os.environ``."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./billing.db"
STRIPE_LIVE_API_BASE = "https://api.stripe.com"
# The URL schemes make_engine() knows: PostgreSQL through psycopg 3, and the embedded SQLite default.
DATABASE_SCHEMES = ("postgresql+psycopg", "postgresql", "sqlite", "sqlite+pysqlite")


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Runtime settings, read from environment variables once at start-up."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    # Storage: a SQLite file in the working directory unless a PostgreSQL URL is given.
    database_url: str = DEFAULT_DATABASE_URL
    database_pool_size: int = Field(default=20, ge=1)
    # A liveness ping on every checkout costs a round trip per unit of work (~30% of a consume). Without it, the
    # first statement after a database restart fails with a retryable error (503) and SQLAlchemy then discards
    # the whole stale pool; every write path is idempotent, so the client's retry is safe.
    database_pool_pre_ping: bool = False
    database_pool_recycle_seconds: int = Field(default=1800, ge=-1)

    # Celery broker. Empty means the embedded default (no server needed).
    celery_broker_url: str = ""
    # Run tasks in-process instead of through a broker (the embedded default's demo and tests).
    celery_task_always_eager: bool = False

    # Stripe. The API base can point at the local emulator in tests and the demo.
    # No default key: a command that would call the live API without one stops with a clear error instead.
    stripe_api_key: SecretStr | None = None
    stripe_api_base: str = STRIPE_LIVE_API_BASE
    stripe_webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    stripe_webhook_tolerance_seconds: int = Field(default=300, ge=1)
    stripe_max_retries: int = Field(default=4, ge=0)

    webhook_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # A client must send a whole request (headers and body) within this many seconds, or `serve` closes it.
    request_read_timeout_seconds: float = Field(default=10.0, ge=0.5)
    # Stored events unhandled for longer than this are "stale": /readyz, the sweep and reconciliation use it.
    unprocessed_event_minutes: int = Field(default=15, ge=1)
    unprocessed_event_threshold: int = Field(default=100, ge=0)
    # The worker commits its event batches without waiting for the WAL flush (see README, "Worker"); true makes
    # it wait like every other commit (the benchmark measures both).
    worker_synchronous_commit: bool = False

    # Usage API consumptions applied in parallel batches (group commit) per server process, on PostgreSQL.
    usage_writers: int = Field(default=4, ge=1, le=64)

    # Bearer tokens accepted by the usage API.
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    # Review pages: signs session cookies and CSRF tokens.
    secret_key: SecretStr = SecretStr("change-me-in-production")
    # Review users as "name:scrypt$...,name2:scrypt$..." (hash with `python -m webhooks.review hash-password`).
    review_users: SecretStr = SecretStr("")

    billing_config: Path | None = None

    # Outbound notifications: how long one delivery attempt may take before it counts as failed.
    notification_timeout_seconds: float = Field(default=10.0, gt=0, le=60)

    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        scheme, sep, _ = value.partition("://")
        if not sep or scheme not in DATABASE_SCHEMES:
            raise ValueError(
                f"scheme {scheme + sep if sep else value!r} is not one this project reads: use "
                "postgresql+psycopg://user:password@host:5432/dbname or sqlite:///path/to/billing.db"
            )
        return value

    @property
    def stripe_is_live(self) -> bool:
        """True when the gateway would call Stripe itself (not the emulator or another local server)."""
        return self.stripe_api_base.rstrip("/") == STRIPE_LIVE_API_BASE

    @field_validator("stripe_webhook_secrets", "api_tokens", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_csv(value)

    @property
    def is_postgres(self) -> bool:
        """True when the database is PostgreSQL (the production path)."""
        return self.database_url.startswith("postgresql")


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad setting by its environment variable, and why."""
    parts = []
    for error in exc.errors():
        loc = error.get("loc", ())
        name = str(loc[0]).upper() if loc else "settings"
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{name}: {message}")
    return "; ".join(parts)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read from the environment on first use."""
    return Settings()


def secrets_from_env(name: str) -> list[SecretStr]:
    """The comma-separated secrets in environment variable ``name`` (several during a secret roll).

    Notification endpoints name their secret's variable in the billing config; this is the one place it is read.
    """
    return [SecretStr(part.strip()) for part in os.environ.get(name, "").split(",") if part.strip()]
