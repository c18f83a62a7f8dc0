"""Usage metered after the fact, from a JSON Lines file: each line a body of ``POST /v1/usage``.

The lines go through the same path as ``POST /v1/usage/batch``: each body checked by the API's own model, then
:func:`ledger.consume.consume_batch` in chunks, each line its own idempotent unit (its ``request_id``), so a
re-import changes nothing and one refused line does not stop the others. Bad lines are reported by number.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pydantic import TypeAdapter, ValidationError

from ledger.consume import ConsumeInput, consume_batch
from ledger.errors import LedgerError
from webhooks.api import ConsumeRequest
from webhooks.responses import ledger_error

_LINE = TypeAdapter(ConsumeRequest)
# Outcomes by name, as the summary shows them; the status is what POST /v1/usage would have answered.
APPLIED, REPLAYED, INVALID = "applied", "replayed", "invalid_request"


@dataclass(frozen=True)
class LineProblem:
    line: int
    status: int
    code: str
    message: str


@dataclass
class ImportReport:
    """How many lines ended how (applied, replayed, or the error code), and which lines failed and why."""

    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[LineProblem] = field(default_factory=list)

    @property
    def lines(self) -> int:
        """Lines read (blank lines aside)."""
        return sum(self.outcomes.values())

    @property
    def clean(self) -> bool:
        """Every line applied now or earlier."""
        return not self.problems


def import_usage(
    lines: Iterable[bytes], *, batch_size: int = 500, progress: Callable[[int], None] | None = None
) -> ImportReport:
    """Apply each JSON line as a usage body; ``progress`` is told how many lines each chunk settled."""
    report = ImportReport()
    pending: list[tuple[int, ConsumeInput]] = []

    def flush() -> None:
        outcomes = consume_batch([item for _, item in pending])
        for (number, _), outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, LedgerError):
                status, body = ledger_error(outcome)
                report.outcomes[outcome.code] += 1
                report.problems.append(LineProblem(number, status, outcome.code, body["error"]["message"]))
            else:
                report.outcomes[REPLAYED if outcome.replayed else APPLIED] += 1
        if progress is not None:
            progress(len(pending))
        pending.clear()

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            body = _LINE.validate_json(line)
        except ValidationError as exc:
            _invalid(report, number, _first_error(exc))
            continue
        if body.request_id is None:
            _invalid(report, number, "request_id: each line needs its own request_id")
            continue
        pending.append((number, body.consume_input(body.request_id)))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return report


def _invalid(report: ImportReport, number: int, message: str) -> None:
    report.outcomes[INVALID] += 1
    report.problems.append(LineProblem(number, 422, INVALID, message))


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ())) or "line"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {error.get('msg', 'invalid')}{more}"
