"""Provider report parsers, on every file in the shared fixtures, with totals computed here from the raw text."""

from __future__ import annotations

import csv
import json
import re
from decimal import Decimal
from pathlib import Path

import pytest

from reconciliation.providers import (
    ReportError,
    ReportFormat,
    ReportKind,
    parse_report,
    parse_report_text,
    parse_reports,
)
from tests.conftest import PROVIDER_FIXTURES

OPENAI = PROVIDER_FIXTURES / "openai"
ANTHROPIC = PROVIDER_FIXTURES / "anthropic"

COSTS_JSON = OPENAI / "costs_response.grouped_line_item_project.constructed.json"
USAGE_JSON = OPENAI / "usage_completions_response.grouped_model_project.constructed.json"
COST_CSV = OPENAI / "cost_export_dashboard.constructed.csv"
SPEC = OPENAI / "openapi_usage_costs_excerpt.json"
ANTHROPIC_COST = ANTHROPIC / "cost_report_response.grouped_workspace_description.constructed.json"
ANTHROPIC_USAGE = ANTHROPIC / "usage_report_messages_response.grouped_model_workspace.constructed.json"


def _decimals_after(key: str, text: str) -> list[Decimal]:
    """Every number written after ``"key":`` in the raw text, read as Decimal from its digits (no float)."""
    return [Decimal(m) for m in re.findall(rf'"{key}"\s*:\s*"?(-?[0-9.]+)"?', text)]


def _ints_after(key: str, text: str) -> int:
    return sum(int(m) for m in re.findall(rf'"{key}"\s*:\s*(\d+)', text))


class TestEveryFixture:
    def test_every_fixture_file_is_covered_here(self) -> None:
        files = sorted(p for p in PROVIDER_FIXTURES.rglob("*") if p.is_file() and p.name != "SOURCES.md")
        assert files == sorted([COSTS_JSON, USAGE_JSON, COST_CSV, SPEC, ANTHROPIC_COST, ANTHROPIC_USAGE])

    def test_openai_costs_json(self) -> None:
        raw = COSTS_JSON.read_text()
        report = parse_report(COSTS_JSON)
        assert report.format is ReportFormat.OPENAI_COSTS
        assert report.provider == "openai" and report.kind is ReportKind.COST
        expected = sum(_decimals_after("value", raw), Decimal(0))
        assert expected == Decimal("19.187315")
        assert report.total_cost_usd == expected
        assert all(isinstance(r.cost_usd, Decimal) for r in report.rows)
        assert len(report.rows) == raw.count('"organization.costs.result"')
        assert {r.day.isoformat() for r in report.rows} == {"2026-05-26", "2026-05-27"}
        first = report.rows[0]
        assert (first.model, first.scope, first.line_item) == (
            "gpt-4o-2024-08-06",
            "proj_Ab12Cd34Ef56Gh78",
            "gpt-4o-2024-08-06, input",
        )
        embed = [r for r in report.rows if r.model == "text-embedding-3-small"]
        assert [r.cost_usd for r in embed] == [Decimal("0.01302")]
        assert report.has_scope

    def test_openai_usage_completions_json(self) -> None:
        raw = USAGE_JSON.read_text()
        doc = json.loads(raw)
        report = parse_report(USAGE_JSON)
        assert report.format is ReportFormat.OPENAI_USAGE_COMPLETIONS and report.kind is ReportKind.USAGE
        results = [r for b in doc["data"] for r in b["results"]]
        assert len(report.rows) == len(results) == 3
        # input_tokens includes cached ones: the ledger's input is the uncached part.
        assert sum(r.input_tokens for r in report.rows) == _ints_after("input_tokens", raw) - _ints_after(
            "input_cached_tokens", raw
        )
        assert sum(r.cached_tokens for r in report.rows) == _ints_after("input_cached_tokens", raw) == 66000
        assert sum(r.output_tokens for r in report.rows) == _ints_after("output_tokens", raw)
        assert sum(r.requests for r in report.rows) == 1432 + 310 + 1201
        gpt4o_day1 = report.rows[0]
        assert (gpt4o_day1.input_tokens, gpt4o_day1.cached_tokens, gpt4o_day1.output_tokens) == (
            1717110 - 66000,
            66000,
            630252,
        )

    def test_openai_usage_and_costs_agree_on_uncached_input(self) -> None:
        costs = parse_report(COSTS_JSON)
        usage = parse_report(USAGE_JSON)
        input_line = next(r for r in costs.rows if r.line_item == "gpt-4o-2024-08-06, input")
        usage_row = next(r for r in usage.rows if r.model == "gpt-4o-2024-08-06" and r.day == input_line.day)
        # $2.50 per million uncached input tokens: the cost line and the usage line describe the same tokens.
        assert input_line.cost_usd == Decimal(usage_row.input_tokens) * Decimal("2.50") / 1_000_000

    def test_openai_cost_csv(self) -> None:
        with COST_CSV.open(newline="") as fh:
            records = list(csv.DictReader(fh))
        expected = sum((Decimal(r["amount_value"]) for r in records), Decimal(0))
        report = parse_report(COST_CSV)
        assert report.format is ReportFormat.OPENAI_COST_CSV and report.kind is ReportKind.COST
        assert expected == Decimal("10.587315")
        assert report.total_cost_usd == expected
        assert len(report.rows) == len(records) == 6
        assert {r.scope for r in report.rows} == {"proj_Ab12Cd34Ef56Gh78", "proj_Zz98Yy76Xx54Ww32"}
        assert report.rows[2].model == "gpt-4o-2024-08-06" and report.rows[2].line_item.endswith("cached input")

    def test_openai_csv_matches_the_costs_api_for_the_same_day(self) -> None:
        api = parse_report(COSTS_JSON)
        export = parse_report(COST_CSV)
        day = next(iter(export.days))
        assert sum((r.cost_usd for r in api.rows if r.day == day), Decimal(0)) == export.total_cost_usd

    def test_anthropic_cost_report_cents_become_dollars(self) -> None:
        raw = ANTHROPIC_COST.read_text()
        cents = _decimals_after("amount", raw)
        report = parse_report(ANTHROPIC_COST)
        assert report.format is ReportFormat.ANTHROPIC_COST_REPORT and report.provider == "anthropic"
        assert sum(cents, Decimal(0)) == Decimal("2699.393")
        assert report.total_cost_usd == sum(cents, Decimal(0)) / 100 == Decimal("26.99393")
        sonnet_in = report.rows[0]
        assert sonnet_in.cost_usd == Decimal("4.9533")
        assert sonnet_in.scope == "wrkspc_01JwQvzr7rXLA5AGx3HKfFUJ"
        web = next(r for r in report.rows if r.line_item == "Web Search Usage")
        assert web.model is None and web.cost_usd == Decimal("0.02")
        haiku = [r for r in report.rows if r.model == "claude-3-5-haiku-20241022"]
        assert {r.scope for r in haiku} == {None}

    def test_anthropic_usage_messages(self) -> None:
        raw = ANTHROPIC_USAGE.read_text()
        report = parse_report(ANTHROPIC_USAGE)
        assert report.format is ReportFormat.ANTHROPIC_USAGE_MESSAGES and report.kind is ReportKind.USAGE
        uncached = _ints_after("uncached_input_tokens", raw)
        writes = _ints_after("ephemeral_1h_input_tokens", raw) + _ints_after("ephemeral_5m_input_tokens", raw)
        assert sum(r.input_tokens for r in report.rows) == uncached + writes == 1651100 + 159375 + 1366700 + 73333
        assert sum(r.cached_tokens for r in report.rows) == _ints_after("cache_read_input_tokens", raw)
        assert sum(r.output_tokens for r in report.rows) == _ints_after("output_tokens", raw)

    def test_anthropic_cost_and_usage_describe_the_same_tokens(self) -> None:
        cost = parse_report(ANTHROPIC_COST)
        usage = parse_report(ANTHROPIC_USAGE)
        sonnet_in = next(r for r in cost.rows if r.line_item == "Claude Sonnet 4 Usage - Input Tokens")
        row = next(r for r in usage.rows if r.model == "claude-sonnet-4-20250514" and r.day == sonnet_in.day)
        # $3 per million uncached input tokens (cache writes are billed on their own line).
        assert sonnet_in.cost_usd == Decimal(row.input_tokens - 73333) * 3 / 1_000_000

    def test_openapi_spec_is_refused_by_name(self) -> None:
        with pytest.raises(ReportError) as err:
            parse_report(SPEC)
        assert str(SPEC) in str(err.value)
        assert "OpenAPI specification" in str(err.value)

    @pytest.mark.parametrize(
        ("path", "expected_format", "expected_cost", "expected_rows"),
        [
            ("/organization/costs", ReportFormat.OPENAI_COSTS, Decimal("0.06"), 1),
            ("/organization/usage/completions", ReportFormat.OPENAI_USAGE_COMPLETIONS, Decimal(0), 1),
            ("/organization/usage/embeddings", ReportFormat.OPENAI_USAGE_EMBEDDINGS, Decimal(0), 1),
        ],
    )
    def test_example_responses_in_the_openapi_spec_parse(
        self, path: str, expected_format: ReportFormat, expected_cost: Decimal, expected_rows: int
    ) -> None:
        spec = json.loads(SPEC.read_text())
        example = spec["paths"][path]["get"]["x-oaiMeta"]["examples"]["response"]
        report = parse_report_text(example, name=f"spec:{path}")
        assert report.format is expected_format
        assert report.total_cost_usd == expected_cost
        assert len(report.rows) == expected_rows
        if expected_format is ReportFormat.OPENAI_USAGE_COMPLETIONS:
            row = report.rows[0]
            assert (row.input_tokens, row.cached_tokens, row.output_tokens) == (600, 400, 500)

    def test_image_usage_example_is_refused_as_unsupported(self) -> None:
        spec = json.loads(SPEC.read_text())
        example = spec["paths"]["/organization/usage/images"]["get"]["x-oaiMeta"]["examples"]["response"]
        with pytest.raises(ReportError, match=r"unsupported OpenAI result object\(s\) organization.usage.images"):
            parse_report_text(example, name="images.json")


class TestMalformedReports:
    def _write(self, tmp_path: Path, name: str, body: str) -> Path:
        path = tmp_path / name
        path.write_text(body, encoding="utf-8")
        return path

    @pytest.mark.parametrize(
        ("body", "problem"),
        [
            ("", "the file is empty"),
            ("{not json", "not valid JSON"),
            ("[1, 2]", "not an object"),
            ('{"hello": 1}', "unknown report format"),
            ("a,b,c\n1,2,3\n", "not an OpenAI cost CSV export"),
            (
                '{"object": "page", "data": [{"object": "bucket", "start_time": 1779753600, "results": '
                '[{"object": "organization.costs.result", "amount": {"value": "x", "currency": "usd"}}]}]}',
                "data[0].results[0].amount.value: 'x' is not a decimal number",
            ),
            (
                '{"object": "page", "data": [{"object": "bucket", "start_time": 1779753600, "results": '
                '[{"object": "organization.costs.result", "amount": {"value": 1.5, "currency": "eur"}}]}]}',
                "only USD amounts",
            ),
            (
                '{"object": "page", "data": [{"object": "bucket", "results": '
                '[{"object": "organization.costs.result", "amount": {"value": 1.5, "currency": "usd"}}]}]}',
                "data[0]: missing field 'start_time'",
            ),
            (
                '{"data": [{"starting_at": "2026-05-26T00:00:00Z", "results": '
                '[{"currency": "USD", "amount": 12.5, "model": "m"}]}]}',
                "expected a decimal string in cents",
            ),
            (
                '{"data": [{"starting_at": "yesterday", "results": [{"currency": "USD", "amount": "1"}]}]}',
                "'yesterday' is not an ISO 8601 time",
            ),
            (
                '{"data": [{"starting_at": "2026-05-26T00:00:00Z", "results": '
                '[{"uncached_input_tokens": -5, "output_tokens": 1}]}]}',
                "must not be negative",
            ),
            (
                '{"object": "page", "data": [{"object": "bucket", "start_time": 1779753600, "results": '
                '[{"object": "organization.usage.completions.result", "input_tokens": 1.5}]}]}',
                "expected an integer",
            ),
            (
                "start_time,end_time,amount_value,amount_currency,line_item\n1779753600,1779840000,abc,usd,x\n",
                "line 2 amount_value: 'abc' is not a decimal number",
            ),
        ],
    )
    def test_a_bad_file_is_a_clear_error_naming_it(self, tmp_path: Path, body: str, problem: str) -> None:
        path = self._write(tmp_path, "report.json", body)
        with pytest.raises(ReportError) as err:
            parse_report(path)
        assert str(path) in str(err.value)
        assert problem in str(err.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ReportError, match="cannot be read"):
            parse_report(tmp_path / "nope.json")

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "bin.csv"
        path.write_bytes(b"\xff\xfe\x00garbage")
        with pytest.raises(ReportError, match="not UTF-8"):
            parse_report(path)

    def test_one_bad_file_among_good_ones_raises(self, tmp_path: Path) -> None:
        bad = self._write(tmp_path, "bad.json", "{")
        with pytest.raises(ReportError, match=r"bad\.json"):
            parse_reports([COSTS_JSON, bad, ANTHROPIC_COST])

    def test_no_float_ever_exists(self) -> None:
        for path in (COSTS_JSON, COST_CSV, ANTHROPIC_COST):
            for row in parse_report(path).rows:
                assert type(row.cost_usd) is Decimal
