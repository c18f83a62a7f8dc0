"""Jinja2 templates for the review pages, with the filters that format money, credits and times."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from ledger.money import format_amount, format_credits, format_money, format_usd
from webhooks.review.auth import csrf_token

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def fmt_int(value: object) -> str:
    """1234567 -> 1,234,567 (credits, tokens, counts)."""
    return format_credits(value)


def fmt_money(minor: object, currency: object = "usd") -> str:
    """Minor units as money by the currency's exponent: (1999, 'usd') -> $19.99 (see ledger.money)."""
    return format_money(minor, currency)


def fmt_usd(value: object, places: int | None = None) -> str:
    """A Decimal USD amount at a readable precision (see ledger.money.format_usd)."""
    return format_usd(value, places)


def fmt_dt(value: object) -> str:
    """A time in UTC, to the second: 2026-11-23 04:05:06."""
    if value is None or value == "":
        return "—"
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, datetime):
        if value.tzinfo is None:  # SQLite hands back naive datetimes; the ledger writes UTC
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


# Keys whose values are credentials wherever they appear in a payload (Stripe's payment intents and checkout
# sessions carry a client_secret): shown as redacted, never rendered.
_SECRET_KEYS = {"client_secret", "secret", "password", "api_key", "secret_key", "ephemeral_key"}
REDACTED = "[redacted]"


def redact(value: Any) -> Any:
    """A copy of a JSON value with every credential-named key's value replaced."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if isinstance(k, str) and (k.lower() in _SECRET_KEYS or k.lower().endswith("_secret"))
                and v is not None else redact(v))
            for k, v in value.items()
        }  # fmt: skip
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


# Deeper than this, a document is shown as stored (redacted by pattern) instead of re-indented: Python's JSON and
# the redaction recurse, and a signed event may legally nest as deep as the receiver's parser allows (1,024).
MAX_PRETTY_DEPTH = 100
_SECRET_VALUE = re.compile(
    r'("(?:[^"\\]*_secret|client_secret|secret|password|api_key|secret_key|ephemeral_key)"\s*:\s*)'
    r'"(?:[^"\\]|\\.)*"',
    re.IGNORECASE,
)


def json_depth(value: object, limit: int = MAX_PRETTY_DEPTH) -> int:
    """How deep a JSON value nests, counted without recursion and no further than ``limit + 1``."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def fmt_json(value: object) -> str:
    """Pretty JSON for evidence and raw events (bytes are decoded as the JSON they were stored as), redacted."""
    raw: str | None = None
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value).decode("utf-8", errors="replace")
        try:
            value = json.loads(raw)
        except RecursionError:
            return _shown_as_stored(raw)
        except ValueError:
            return "(not JSON: not shown)"
    if json_depth(value) > MAX_PRETTY_DEPTH:
        return _shown_as_stored(raw if raw is not None else _dump_flat(value))
    return json.dumps(redact(value), indent=2, sort_keys=True, default=str, ensure_ascii=False)


def _shown_as_stored(text: str) -> str:
    return f"(nested deeper than {MAX_PRETTY_DEPTH} levels: shown as stored)\n" + _SECRET_VALUE.sub(
        lambda m: m.group(1) + f'"{REDACTED}"', text
    )


def _dump_flat(value: object) -> str:
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except RecursionError:
        return "(too deeply nested to show)"


def fmt_amount(value: object, unit: object = "minor", currency: object = None) -> str:
    """A mismatch amount in its unit: money in minor units, credits, tokens, USD, or a plain count."""
    return format_amount(value, unit, currency)


def stripe_object(payload: object) -> str:
    """The data.object of a stored event's raw JSON, pretty-printed (the whole payload if it has none)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        try:
            doc = json.loads(bytes(payload))
        except RecursionError:
            return fmt_json(payload)
        except ValueError:
            return "(not JSON: not shown)"
        if json_depth(doc) > MAX_PRETTY_DEPTH:
            return fmt_json(payload)
        data = doc.get("data") if isinstance(doc, dict) else None
        if isinstance(data, dict) and "object" in data:
            return fmt_json(data["object"])
        return fmt_json(doc)
    return fmt_json(payload)


def query_with(request: Request, **changes: object) -> str:
    """The current query string with some parameters replaced (None removes one)."""
    params = {k: v for k, v in request.query_params.items() if v != ""}
    for key, value in changes.items():
        if value is None or value == "":
            params.pop(key, None)
        else:
            params[key] = str(value)
    return "?" + urlencode(params) if params else "?"


def _make_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        int=fmt_int,
        money=fmt_money,
        usd=fmt_usd,
        dt=fmt_dt,
        pretty_json=fmt_json,
        amount=fmt_amount,
        stripe_object=stripe_object,
    )
    env.globals.update(query_with=query_with)
    return Jinja2Templates(env=env)


templates = _make_templates()


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    """Render a review template with the user, CSRF token, base path and flash messages in its context."""
    user = getattr(request.state, "review_user", None)
    flashes = request.session.pop("flash", []) if "flash" in request.session else []
    base = request.scope.get("root_path", "")
    full = {
        "request": request,
        "section": "",
        "user": user,
        "csrf_token": csrf_token(request),
        "base": base,
        "flashes": flashes,
        **context,
    }
    return templates.TemplateResponse(request, name, full, status_code=status_code)


def flash(request: Request, message: str, kind: str = "ok") -> None:
    """Queue a message for the next page this session sees."""
    messages = list(request.session.get("flash", []))
    messages.append({"kind": kind, "text": message})
    request.session["flash"] = messages[-5:]
