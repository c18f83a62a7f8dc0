"""AI provider cost and usage reports, parsed into typed rows.

Supported, detected from the content (never from the file name):

* OpenAI Costs API (``GET /v1/organization/costs``): ``amount.value`` is a JSON number in **dollars**;
* OpenAI Usage API for completions and embeddings (``GET /v1/organization/usage/{completions,embeddings}``);
* OpenAI's dashboard cost export (CSV: ``start_time, end_time, amount_value, amount_currency, line_item, ...``);
* Anthropic ``cost_report``: ``amount`` is a decimal string in **cents** ("123.45" is $1.2345);
* Anthropic ``usage_report/messages``.

JSON is decoded with ``parse_float=Decimal`` so that no float ever exists. Token fields follow the ledger's
meaning: ``input_tokens`` are uncached input tokens (cache writes included), ``cached_tokens`` are cache reads,
as in OpenAI's ``input_tokens - input_cached_tokens`` and Anthropic's ``uncached_input_tokens +
cache_creation.*``. See https://platform.openai.com/docs/api-reference/usage and
https://docs.anthropic.com/en/api/usage-cost-api.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Any

CENTS = Decimal(100)


class ReportError(ValueError):
    """A provider report could not be read: the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"provider report {path}: {problem}")
        self.path = str(path)
        self.problem = problem


class ReportFormat(StrEnum):
    OPENAI_COSTS = "openai_costs"
    OPENAI_USAGE_COMPLETIONS = "openai_usage_completions"
    OPENAI_USAGE_EMBEDDINGS = "openai_usage_embeddings"
    OPENAI_COST_CSV = "openai_cost_csv"
    ANTHROPIC_COST_REPORT = "anthropic_cost_report"
    ANTHROPIC_USAGE_MESSAGES = "anthropic_usage_messages"


class ReportKind(StrEnum):
    COST = "cost"
    USAGE = "usage"


@dataclass(frozen=True, slots=True)
class ProviderRow:
    """One line of a provider report: a cost (USD) or a token count for a day, model and project/workspace."""

    provider: str
    kind: ReportKind
    day: date
    model: str | None
    scope: str | None  # OpenAI project_id or Anthropic workspace_id
    cost_usd: Decimal = Decimal(0)
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0
    line_item: str | None = None
    # Where the row came from, for evidence: file name and position.
    source: str = ""

    def evidence(self) -> dict[str, Any]:
        """A JSON-ready description of this row for a mismatch's evidence."""
        return {
            "source": self.source,
            "provider": self.provider,
            "kind": self.kind.value,
            "day": self.day.isoformat(),
            "model": self.model,
            "scope": self.scope,
            "line_item": self.line_item,
            "cost_usd": str(self.cost_usd),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
        }


@dataclass(frozen=True)
class ProviderReport:
    """A parsed report: its format, the days it covers and its rows."""

    path: Path
    format: ReportFormat
    provider: str
    kind: ReportKind
    rows: tuple[ProviderRow, ...]
    days: frozenset[date]
    # True when the report is broken down by project or workspace (so the ledger side is too).
    has_scope: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def total_cost_usd(self) -> Decimal:
        """The sum of every row's cost."""
        return sum((r.cost_usd for r in self.rows), Decimal(0))


# --- helpers ---------------------------------------------------------------------------------------------------


class _Problem(Exception):
    """A problem at a location inside the report; turned into a ReportError naming the file."""


def _get(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise _Problem(f"{where}: missing field {key!r}")
    return obj[key]


def _int(value: Any, where: str, *, optional: bool = True) -> int:
    if value is None and optional:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise _Problem(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, Decimal) and value != value.to_integral_value():
        raise _Problem(f"{where}: expected an integer, got {value}")
    result = int(value)
    if result < 0:
        raise _Problem(f"{where}: must not be negative, got {result}")
    return result


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool):
        raise _Problem(f"{where}: expected a number, got {value!r}")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except InvalidOperation as exc:
            raise _Problem(f"{where}: {value!r} is not a decimal number") from exc
    else:
        raise _Problem(f"{where}: expected a number, got {value!r}")
    if not result.is_finite():
        raise _Problem(f"{where}: {value!r} is not a finite number")
    return result


def _str_or_none(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Problem(f"{where}: expected a string, got {value!r}")
    return value


def _epoch_day(value: Any, where: str) -> date:
    seconds = _int(value, where, optional=False)
    return datetime.fromtimestamp(seconds, tz=UTC).date()


def _iso_day(value: Any, where: str) -> date:
    if not isinstance(value, str):
        raise _Problem(f"{where}: expected an ISO 8601 time, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise _Problem(f"{where}: {value!r} is not an ISO 8601 time") from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC)
    return parsed.date()


def _currency(value: Any, where: str) -> None:
    if not isinstance(value, str) or value.lower() != "usd":
        raise _Problem(f"{where}: only USD amounts are supported, got currency {value!r}")


def _split_line_item(line_item: str | None) -> tuple[str | None, str | None]:
    """OpenAI's ``"gpt-4o-2024-08-06, cached input"`` -> (model, token type)."""
    if not line_item:
        return None, None
    model, sep, token_type = line_item.rpartition(",")
    if not sep:
        return line_item.strip(), None
    return model.strip(), token_type.strip()


def _buckets(doc: Mapping[str, Any]) -> list[Any]:
    data = doc.get("data")
    if not isinstance(data, list):
        raise _Problem("'data' is not a list of buckets")
    return data


def _results(bucket: Any, where: str) -> list[Any]:
    if not isinstance(bucket, Mapping):
        raise _Problem(f"{where}: bucket is not an object")
    results = _get(bucket, "results", where)
    if not isinstance(results, list):
        raise _Problem(f"{where}.results: not a list")
    for i, row in enumerate(results):
        if not isinstance(row, Mapping):
            raise _Problem(f"{where}.results[{i}]: not an object")
    return results


def _bucket_results(
    doc: Mapping[str, Any], days: set[date], *, start_key: str, day_of: Callable[[Any, str], date]
) -> Iterator[tuple[date, str, Mapping[str, Any]]]:
    """Each result of a bucketed report, with its bucket's day and its place (``data[0].results[1]``).

    Every bucket's day goes into ``days``, an empty one too: a day with no results was still reported.
    """
    for b, bucket in enumerate(_buckets(doc)):
        where = f"data[{b}]"
        results = _results(bucket, where)
        day = day_of(_get(bucket, start_key, where), f"{where}.{start_key}")
        days.add(day)
        for r, res in enumerate(results):
            yield day, f"{where}.results[{r}]", res


# --- OpenAI ----------------------------------------------------------------------------------------------------


def _openai_costs(doc: Mapping[str, Any], name: str) -> tuple[list[ProviderRow], set[date]]:
    rows: list[ProviderRow] = []
    days: set[date] = set()
    for day, at, res in _bucket_results(doc, days, start_key="start_time", day_of=_epoch_day):
        amount = _get(res, "amount", at)
        if not isinstance(amount, Mapping):
            raise _Problem(f"{at}.amount: not an object")
        _currency(amount.get("currency"), f"{at}.amount.currency")
        line_item = _str_or_none(res.get("line_item"), f"{at}.line_item")
        model, _ = _split_line_item(line_item)
        rows.append(
            ProviderRow(
                provider="openai",
                kind=ReportKind.COST,
                day=day,
                model=model,
                scope=_str_or_none(res.get("project_id"), f"{at}.project_id"),
                cost_usd=_decimal(_get(amount, "value", f"{at}.amount"), f"{at}.amount.value"),
                line_item=line_item,
                source=f"{name}:{at}",
            )
        )
    return rows, days


def _openai_usage(doc: Mapping[str, Any], name: str, *, embeddings: bool) -> tuple[list[ProviderRow], set[date]]:
    rows: list[ProviderRow] = []
    days: set[date] = set()
    for day, at, res in _bucket_results(doc, days, start_key="start_time", day_of=_epoch_day):
        total_input = _int(_get(res, "input_tokens", at), f"{at}.input_tokens")
        cached = 0 if embeddings else _int(res.get("input_cached_tokens"), f"{at}.input_cached_tokens")
        if cached > total_input:
            raise _Problem(f"{at}: input_cached_tokens {cached} exceeds input_tokens {total_input}")
        rows.append(
            ProviderRow(
                provider="openai",
                kind=ReportKind.USAGE,
                day=day,
                model=_str_or_none(res.get("model"), f"{at}.model"),
                scope=_str_or_none(res.get("project_id"), f"{at}.project_id"),
                input_tokens=total_input - cached,
                output_tokens=0 if embeddings else _int(res.get("output_tokens"), f"{at}.output_tokens"),
                cached_tokens=cached,
                requests=_int(res.get("num_model_requests"), f"{at}.num_model_requests"),
                source=f"{name}:{at}",
            )
        )
    return rows, days


CSV_REQUIRED = ("start_time", "amount_value", "amount_currency", "line_item")


def _openai_cost_csv(text: str, name: str) -> tuple[list[ProviderRow], set[date]]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in CSV_REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise _Problem(f"CSV header lacks column(s) {', '.join(missing)}")
    rows: list[ProviderRow] = []
    days: set[date] = set()
    for line_no, rec in enumerate(reader, start=2):
        at = f"line {line_no}"
        if None in rec:
            raise _Problem(f"{at}: more fields than the header has")
        start = (rec.get("start_time") or "").strip()
        if start.isdigit():
            day = datetime.fromtimestamp(int(start), tz=UTC).date()
        else:
            day = _iso_day(start, f"{at} start_time")
        days.add(day)
        _currency(rec.get("amount_currency"), f"{at} amount_currency")
        line_item = (rec.get("line_item") or "").strip() or None
        model, _ = _split_line_item(line_item)
        rows.append(
            ProviderRow(
                provider="openai",
                kind=ReportKind.COST,
                day=day,
                model=model,
                scope=(rec.get("project_id") or "").strip() or None,
                cost_usd=_decimal(rec.get("amount_value") or "", f"{at} amount_value"),
                line_item=line_item,
                source=f"{name}:{at}",
            )
        )
    return rows, days


# --- Anthropic -------------------------------------------------------------------------------------------------


def _anthropic_cost(doc: Mapping[str, Any], name: str) -> tuple[list[ProviderRow], set[date]]:
    rows: list[ProviderRow] = []
    days: set[date] = set()
    for day, at, res in _bucket_results(doc, days, start_key="starting_at", day_of=_iso_day):
        _currency(_get(res, "currency", at), f"{at}.currency")
        amount = _get(res, "amount", at)
        if not isinstance(amount, str):
            # The API sends a decimal string; a bare number would mean a different (unknown) schema.
            raise _Problem(f"{at}.amount: expected a decimal string in cents, got {amount!r}")
        cents = _decimal(amount, f"{at}.amount")
        rows.append(
            ProviderRow(
                provider="anthropic",
                kind=ReportKind.COST,
                day=day,
                model=_str_or_none(res.get("model"), f"{at}.model"),
                scope=_str_or_none(res.get("workspace_id"), f"{at}.workspace_id"),
                cost_usd=cents / CENTS,
                line_item=_str_or_none(res.get("description"), f"{at}.description"),
                source=f"{name}:{at}",
            )
        )
    return rows, days


def _anthropic_usage(doc: Mapping[str, Any], name: str) -> tuple[list[ProviderRow], set[date]]:
    rows: list[ProviderRow] = []
    days: set[date] = set()
    for day, at, res in _bucket_results(doc, days, start_key="starting_at", day_of=_iso_day):
        creation = res.get("cache_creation") or {}
        if not isinstance(creation, Mapping):
            raise _Problem(f"{at}.cache_creation: not an object")
        cache_writes = sum(
            _int(v, f"{at}.cache_creation.{k}") for k, v in creation.items() if k.endswith("_input_tokens")
        )
        rows.append(
            ProviderRow(
                provider="anthropic",
                kind=ReportKind.USAGE,
                day=day,
                model=_str_or_none(res.get("model"), f"{at}.model"),
                scope=_str_or_none(res.get("workspace_id"), f"{at}.workspace_id"),
                input_tokens=_int(_get(res, "uncached_input_tokens", at), f"{at}.uncached_input_tokens") + cache_writes,
                output_tokens=_int(_get(res, "output_tokens", at), f"{at}.output_tokens"),
                cached_tokens=_int(res.get("cache_read_input_tokens"), f"{at}.cache_read_input_tokens"),
                source=f"{name}:{at}",
            )
        )
    return rows, days


# --- detection -------------------------------------------------------------------------------------------------

_OPENAI_RESULT_OBJECTS = {
    "organization.costs.result": ReportFormat.OPENAI_COSTS,
    "organization.usage.completions.result": ReportFormat.OPENAI_USAGE_COMPLETIONS,
    "organization.usage.embeddings.result": ReportFormat.OPENAI_USAGE_EMBEDDINGS,
}


def _first_results(doc: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    data = doc.get("data")
    if not isinstance(data, list):
        return
    for bucket in data:
        if isinstance(bucket, Mapping) and isinstance(bucket.get("results"), list):
            for res in bucket["results"]:
                if isinstance(res, Mapping):
                    yield res


def detect_json_format(doc: Any) -> ReportFormat:
    """Tell which provider report a decoded JSON document is; raise _Problem if none."""
    if not isinstance(doc, Mapping):
        raise _Problem("the JSON document is not an object")
    if "openapi" in doc or "paths" in doc:
        raise _Problem("this is an OpenAPI specification, not a cost or usage report")
    if not isinstance(doc.get("data"), list):
        raise _Problem("unknown report format: no 'data' list of time buckets")
    buckets = [b for b in doc["data"] if isinstance(b, Mapping)]
    if doc.get("object") == "page" or any(b.get("object") == "bucket" for b in buckets):
        objects = {res.get("object") for res in _first_results(doc)}
        known = {_OPENAI_RESULT_OBJECTS[o] for o in objects if o in _OPENAI_RESULT_OBJECTS}
        unknown = sorted(str(o) for o in objects if o not in _OPENAI_RESULT_OBJECTS)
        if unknown:
            raise _Problem(f"unsupported OpenAI result object(s) {', '.join(unknown)}")
        if len(known) > 1:
            raise _Problem("an OpenAI page mixes costs and usage results")
        if not known:
            raise _Problem("an OpenAI page with no results: cannot tell costs from usage")
        return known.pop()
    if any("starting_at" in b for b in buckets):
        results = list(_first_results(doc))
        if any("amount" in r for r in results):
            return ReportFormat.ANTHROPIC_COST_REPORT
        if any("uncached_input_tokens" in r or "output_tokens" in r for r in results):
            return ReportFormat.ANTHROPIC_USAGE_MESSAGES
        raise _Problem("an Anthropic report with no recognisable results: cannot tell cost from usage")
    raise _Problem("unknown report format: neither an OpenAI page nor an Anthropic report")


_PROVIDER = {
    ReportFormat.OPENAI_COSTS: ("openai", ReportKind.COST),
    ReportFormat.OPENAI_USAGE_COMPLETIONS: ("openai", ReportKind.USAGE),
    ReportFormat.OPENAI_USAGE_EMBEDDINGS: ("openai", ReportKind.USAGE),
    ReportFormat.OPENAI_COST_CSV: ("openai", ReportKind.COST),
    ReportFormat.ANTHROPIC_COST_REPORT: ("anthropic", ReportKind.COST),
    ReportFormat.ANTHROPIC_USAGE_MESSAGES: ("anthropic", ReportKind.USAGE),
}


def parse_report_text(text: str, *, name: str = "<report>") -> ProviderReport:
    """Parse a report from its text; raise ReportError naming ``name`` and the problem."""
    path = Path(name)
    try:
        stripped = text.lstrip("\ufeff \t\r\n")
        if not stripped:
            raise _Problem("the file is empty")
        if stripped[0] in "{[":
            try:
                doc = json.loads(stripped, parse_float=Decimal)
            except json.JSONDecodeError as exc:
                raise _Problem(f"not valid JSON: {exc}") from exc
            fmt = detect_json_format(doc)
            if fmt is ReportFormat.OPENAI_COSTS:
                rows, days = _openai_costs(doc, path.name)
            elif fmt is ReportFormat.OPENAI_USAGE_COMPLETIONS:
                rows, days = _openai_usage(doc, path.name, embeddings=False)
            elif fmt is ReportFormat.OPENAI_USAGE_EMBEDDINGS:
                rows, days = _openai_usage(doc, path.name, embeddings=True)
            elif fmt is ReportFormat.ANTHROPIC_COST_REPORT:
                rows, days = _anthropic_cost(doc, path.name)
            else:
                rows, days = _anthropic_usage(doc, path.name)
        else:
            header = stripped.splitlines()[0]
            if "amount_value" not in header or "line_item" not in header:
                raise _Problem("unknown report format: not JSON, and not an OpenAI cost CSV export")
            fmt = ReportFormat.OPENAI_COST_CSV
            rows, days = _openai_cost_csv(stripped, path.name)
    except _Problem as exc:
        raise ReportError(path, str(exc)) from None
    provider, kind = _PROVIDER[fmt]
    return ProviderReport(
        path=path,
        format=fmt,
        provider=provider,
        kind=kind,
        rows=tuple(rows),
        days=frozenset(days),
        has_scope=any(r.scope is not None for r in rows),
    )


def parse_report(path: Path | str) -> ProviderReport:
    """Read and parse one provider report file; raise ReportError naming the file and the problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ReportError(path, f"cannot be read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReportError(path, f"is not UTF-8 text: {exc}") from exc
    report = parse_report_text(text, name=str(path))
    return report


def parse_reports(paths: Sequence[Path | str]) -> list[ProviderReport]:
    """Parse every report, all before anything is written: the first bad file raises."""
    return [parse_report(p) for p in paths]
