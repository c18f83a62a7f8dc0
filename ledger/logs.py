"""Structured logging (structlog), configured once at start-up by the process's edge."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Values that look like credentials are masked wherever they appear in a log event.
_SECRET = re.compile(r"\b(sk|rk|pk)_(live|test)_[A-Za-z0-9]+|\bwhsec_[A-Za-z0-9]+|\bBearer\s+\S+")
# A credential sent in a query string (``?token=...``, ``&api_key=...``): the value goes, the name stays, so the
# log still says a token was sent. Access logs print the whole request target.
_QUERY_SECRET = re.compile(
    r"([?&;](?:[A-Za-z0-9_.-]*?)(?:token|api[_-]?key|key|secret|password|passwd|auth|authorization|session|"
    r"signature|sig|code)=)[^&;#\s\"']*",
    re.IGNORECASE,
)


def redact_text(value: str) -> str:
    """``value`` with every credential-looking part (API keys, bearer tokens, query-string tokens) masked."""
    return _QUERY_SECRET.sub(r"\1[redacted]", _SECRET.sub("[redacted]", value))


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if isinstance(value, str):
            event[key] = redact_text(value)
    return event


def configure_logging(level: str = "INFO", *, json: bool = False) -> None:
    """Route stdlib and structlog output through one renderer (JSON in production, console otherwise)."""
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    structlog.configure(
        processors=[*processors, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=processors, processor=renderer))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get_logger(name: str) -> Any:
    """A structlog logger bound to ``name``."""
    return structlog.get_logger(name)
