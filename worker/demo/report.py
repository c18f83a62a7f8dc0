"""What the demo prints: balances, the mismatch report, the deliberate discrepancies it found, and where to look."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from ledger.money import format_amount, format_credits, format_usd
from ledger.queries import BalanceSummary, usage_summary
from reconciliation import services
from reconciliation.models import MismatchStatus

if TYPE_CHECKING:
    from worker.demo.metering import ProviderPlan
    from worker.demo.stripe_script import DemoCustomer, StripeStory


def safe_url(url: str) -> str:
    """A database URL without its password."""
    return make_url(url).render_as_string(hide_password=True)


def balance_row(summary: BalanceSummary, customer: DemoCustomer) -> dict[str, Any]:
    """One customer's balance as printed."""
    return {
        "customer_id": summary.customer_id,
        "name": customer.name,
        "story": customer.story,
        "balance": summary.balance,
        "held": summary.held,
        "debt": summary.debt,
        "available": summary.available,
        "access_state": summary.access_state.value,
        "usage_allowed": summary.usage_allowed,
        "live_grants": len(summary.grants),
    }


# Evidence fields worth a glance in a one-line summary (the review pages show all of it).
EVIDENCE_KEYS = {"id", "source", "usage_records", "provider_cost_usd", "amount", "status", "type"}


def provider_tokens(provider: str, usage: dict[str, Any]) -> dict[str, int]:
    """Uncached input, cached input and output tokens of a provider's usage object (its own field names)."""
    if provider == "openai":
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        return {
            "input_tokens": int(usage["prompt_tokens"]) - cached,
            "cached_tokens": cached,
            "output_tokens": int(usage["completion_tokens"]),
        }
    return {
        "input_tokens": int(usage["input_tokens"]) + int(usage.get("cache_creation_input_tokens") or 0),
        "cached_tokens": int(usage.get("cache_read_input_tokens") or 0),
        "output_tokens": int(usage["output_tokens"]),
    }


def usage_by_model(session: Session, customer_ids: list[str]) -> list[dict[str, Any]]:
    """Usage of the demo's customers by model (through the ledger's usage report): calls, tokens, credits, cost."""
    totals: dict[str, dict[str, Any]] = {}
    for customer_id in customer_ids:
        for row in usage_summary(session, customer_id, since=None, until=None, group_by="model"):
            t = totals.setdefault(
                row.key or "(no model)",
                {"requests": 0, "input_tokens": 0, "output_tokens": 0, "credits": 0, "provider_cost_usd": Decimal(0)},
            )
            t["requests"] += row.requests
            t["input_tokens"] += row.input_tokens
            t["output_tokens"] += row.output_tokens
            t["credits"] += row.credits
            t["provider_cost_usd"] += row.provider_cost_usd
    return [{"model": k, **v, "provider_cost_usd": str(v["provider_cost_usd"])} for k, v in sorted(totals.items())]


def _ids(evidence: Any, found: list[str], depth: int = 0) -> None:
    if depth > 4 or len(found) >= 4:
        return
    if isinstance(evidence, dict):
        for key, value in evidence.items():
            if isinstance(value, str | int) and (key in EVIDENCE_KEYS or key.endswith("_id")) and value != "":
                text = f"{key}={value}"
                if text not in found and len(found) < 4:
                    found.append(text)
            else:
                _ids(value, found, depth + 1)
    elif isinstance(evidence, list):
        for item in evidence[:3]:
            _ids(item, found, depth + 1)


def evidence_summary(evidence: Any) -> str:
    """The sides of the evidence and the first ids in each, in a line."""
    if not isinstance(evidence, dict):
        return ""
    parts = []
    for side, value in evidence.items():
        found: list[str] = []
        _ids(value, found)
        parts.append(f"{side}: {', '.join(found)}" if found else side)
    return "; ".join(parts)


def open_mismatches(session: Session) -> list[dict[str, Any]]:
    """Every open mismatch, as the reconciliation tables hold them."""
    rows = []
    for mismatch in services.list_mismatches(session, status=MismatchStatus.OPEN):
        data = services.mismatch_dict(mismatch)
        rows.append(
            {
                "id": data["id"],
                "kind": data["kind"],
                "customer_id": data["customer_id"],
                "expected": data["expected"],
                "actual": data["actual"],
                "unit": data["unit"],
                "currency": data["currency"],
                "summary": data["summary"],
                "evidence": evidence_summary(data["evidence"]),
                "identity": _provider_ident(data["evidence"]),
            }
        )
    return rows


def _provider_ident(evidence: Any) -> str | None:
    provider = evidence.get("provider") if isinstance(evidence, dict) else None
    if isinstance(provider, dict) and "day" in provider:
        return f"{provider.get('provider')}|{provider.get('day')}|{provider.get('model')}|{provider.get('scope')}"
    return None


def deliberate_findings(
    story: StripeStory, plan: ProviderPlan | None, mismatches: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each discrepancy the demo made on purpose, and the mismatches that report it."""
    expected: list[dict[str, Any]] = [
        {
            "label": "cleo_topup",
            "why": "Cleo's top-up events never reached the receiver",
            "kind": "payment_without_grant",
            "match": lambda m: (
                m["kind"] == "payment_without_grant" and m["customer_id"] == story.customer("cleo").customer_id
            ),
        },
        {
            "label": "dan_refund",
            "why": "the full refund of Dan's small pack never reached the receiver",
            "kind": "refund_not_clawed_back",
            "match": lambda m: (
                m["kind"] == "refund_not_clawed_back" and m["customer_id"] == story.customer("dan").customer_id
            ),
        },
    ]
    for event_id in sorted(story.withheld_ids):
        expected.append(
            {
                "label": "missed_event",
                "why": f"event {event_id} was held back",
                "kind": "missed_event",
                "match": lambda m, e=event_id: m["kind"] == "missed_event" and e in m["summary"],
            }
        )
    for item in plan.discrepancies if plan is not None else []:
        for kind in item["kinds"]:
            expected.append(
                {
                    "label": item["label"],
                    "why": item["why"],
                    "kind": kind,
                    "match": lambda m, k=kind, i=item["ident"]: m["kind"] == k and m["identity"] == i,
                }
            )
    out = []
    for item in expected:
        hits = [m["id"] for m in mismatches if item["match"](m)]
        out.append(
            {
                "label": item["label"],
                "why": item["why"],
                "kind": item["kind"],
                "found": bool(hits),
                "mismatch_ids": hits,
            }
        )
    return out


def print_summary(console: Console, summary: dict[str, Any], story: StripeStory) -> None:
    """Balances, mismatches, the deliberate discrepancies and the addresses, as tables."""
    balances = Table(title="Balances (credits)", title_justify="left")
    for column in ("customer", "name", "balance", "held", "debt", "available", "access"):
        balances.add_column(column, justify="right" if column in ("balance", "held", "debt", "available") else "left")
    for row in summary["customers"]:
        balances.add_row(
            row["customer_id"],
            row["name"],
            format_credits(row["balance"]),
            format_credits(row["held"]),
            format_credits(row["debt"]),
            format_credits(row["available"]),
            row["access_state"] + ("" if row["usage_allowed"] else " (refused)"),
        )
    console.print()
    console.print(balances)
    for c in story.customers:
        console.print(f"  [dim]{c.name}: {c.story}[/dim]")

    ai = Table(
        title="AI calls through the wrapped openai / anthropic SDKs: what the provider reported, what was charged",
        title_justify="left",
    )
    for column in ("customer", "user", "feature", "model", "stream", "input", "cached", "output", "charged", "hold"):
        ai.add_column(column, justify="right" if column in ("input", "cached", "output", "charged") else "left")
    for row in summary["ai_calls"]:
        reported = provider_tokens(row["provider"], row["reported"])
        ai.add_row(
            row["customer_id"],
            row["user_id"],
            row["feature"],
            row["model"],
            "yes" if row["stream"] else "",
            format_credits(reported["input_tokens"]),
            format_credits(reported["cached_tokens"]),
            format_credits(reported["output_tokens"]),
            format_credits(row["charged"]),
            row["hold_status"],
        )
    console.print(ai)
    console.print(
        "  [dim]input: uncached prompt tokens; each call was held before it was made and captured at the usage "
        "the provider reported, priced by the billing config[/dim]"
    )

    usage = Table(title="Usage metered through the usage API, by model", title_justify="left")
    for column in ("model", "calls", "input tokens", "output tokens", "credits", "provider cost (USD)"):
        usage.add_column(column, justify="left" if column == "model" else "right")
    for row in summary["usage_by_model"]:
        usage.add_row(
            row["model"],
            format_credits(row["requests"]),
            format_credits(row["input_tokens"]),
            format_credits(row["output_tokens"]),
            format_credits(row["credits"]),
            format_usd(row["provider_cost_usd"]),
        )
    console.print(usage)

    recon = summary["reconciliation"]
    for run in recon["runs"]:
        counts = ", ".join(f"{k} {v}" for k, v in run["counts"].items()) or "nothing"
        console.print(f"reconciliation run {run['run_id']} [{run['since']}, {run['until']}): {counts}", soft_wrap=True)
    table = Table(title=f"Open mismatches ({len(recon['mismatches'])})", title_justify="left", show_lines=False)
    for column in ("id", "kind", "customer", "expected", "actual", "unit", "summary / evidence"):
        table.add_column(column, overflow="fold")
    for m in recon["mismatches"]:
        table.add_row(
            str(m["id"]),
            m["kind"],
            m["customer_id"] or "",
            format_amount(m["expected"], m["unit"], m.get("currency")) if m["expected"] is not None else "",
            format_amount(m["actual"], m["unit"], m.get("currency")) if m["actual"] is not None else "",
            m["unit"] or "",
            f"{m['summary']}\n[dim]{m['evidence']}[/dim]",
        )
    console.print(table)

    if any(m["kind"] == "negative_margin" for m in recon["mismatches"]):
        console.print(
            "[dim]negative_margin: the example billing config charges tokens at the providers' list prices "
            "(1 credit = $0.01), so credits sold at a discount (the large pack, the plans) bring in less than the "
            "calls cost. Raise the credit prices in your billing config to earn a margin.[/dim]"
        )

    deliberate = Table(title="Deliberate discrepancies", title_justify="left")
    for column in ("made on purpose", "expected finding", "found"):
        deliberate.add_column(column)
    for item in summary["deliberate"]:
        mark = (
            f"[green]yes[/green] #{', #'.join(str(i) for i in item['mismatch_ids'])}"
            if item["found"]
            else "[red]NO[/red]"
        )
        deliberate.add_row(item["why"], item["kind"], mark)
    console.print(deliberate)

    violations = summary["ledger_check"]["violations"]
    console.print(
        "ledger check: " + ("[green]every invariant holds[/green]" if not violations else f"[red]{violations}[/red]")
    )
    urls = summary["urls"]
    login = summary["review_login"]
    console.print(
        f"\nReview pages: [bold]{urls['review']}[/bold]  login [bold]{login['user']}[/bold] / "
        f"[bold]{login['password']}[/bold]\n"
        f"Usage API: {urls['usage_api']} (Authorization: Bearer {summary['api_token']})  "
        f"OpenAPI: {urls['openapi']}\n"
        f"Stripe emulator: {urls['stripe_emulator']}  Database: {summary['database_url']}"
    )
