"""The one typed settings object. Nothing else in the project reads ``os.environ``."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./billing.db"


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
    stripe_api_key: SecretStr = SecretStr("sk_test_emulator")
    stripe_api_base: str = "https://api.stripe.com"
    stripe_webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    stripe_webhook_tolerance_seconds: int = Field(default=300, ge=1)
    stripe_max_retries: int = Field(default=4, ge=0)

    webhook_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Stored events unhandled for longer than this are "stale": /readyz, the sweep and reconciliation use it.
    unprocessed_event_minutes: int = Field(default=15, ge=1)
    unprocessed_event_threshold: int = Field(default=100, ge=0)

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

    @field_validator("stripe_webhook_secrets", "api_tokens", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_csv(value)

    @property
    def is_postgres(self) -> bool:
        """True when the database is PostgreSQL (the production path)."""
        return self.database_url.startswith("postgresql")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read from the environment on first use."""
    return Settings()


def secrets_from_env(name: str) -> list[SecretStr]:
    """The comma-separated secrets in environment variable ``name`` (several during a secret roll).

    Notification endpoints name their secret's variable in the billing config; this is the one place it is read.
    """
    return [SecretStr(part.strip()) for part in os.environ.get(name, "").split(",") if part.strip()]
