"""What the review pages show and do, signed in, on both backends."""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from ledger.consume import consume
from ledger.grants import grant_credits
from ledger.inbox import parse_envelope, store_event
from ledger.models import GrantSource
from reconciliation.models import Mismatch, MismatchAction, MismatchKind, MismatchStatus
from reconciliation.services import Finding
from tests.review.conftest import (
    REVIEWER,
    add_case,
    add_run,
    csrf_from,
    log_in,
    mounted_review_app,
    seed,
    stripe_event,
)

_ROW_ID = re.compile(r'<tr id="mismatch-(\d+)">')


def _ids(html: str) -> list[int]:
    return [int(i) for i in _ROW_ID.findall(html)]


def _next_link(html: str) -> str | None:
    found = re.search(r'<a rel="next" href="([^"]+)"', html)
    return found.group(1).replace("&amp;", "&") if found else None


def _prev_link(html: str) -> str | None:
    found = re.search(r'<a rel="prev" href="([^"]+)"', html)
    return found.group(1).replace("&amp;", "&") if found else None


def _many_cases(engine: Engine, n: int) -> list[int]:
    """n amount mismatches with distinct differences (i * 7 % 101) and first-seen times a minute apart."""
    base = datetime(2026, 10, 1, tzinfo=UTC)
    ids = []
    with Session(engine) as session, session.begin():
        run = add_run(session, since=base, until=base + timedelta(days=1), counts={"amount_mismatch": n})
        for i in range(n):
            ids.append(
                add_case(
                    session,
                    run,
                    Finding(
                        kind=MismatchKind.AMOUNT_MISMATCH,
                        identity=f"pi_many_{i}",
                        summary=f"case {i}",
                        customer_id=f"cus_{i % 3}",
                        unit="credits",
                        expected=1000,
                        actual=1000 + (i * 7 % 101),
                        occurred_at=base + timedelta(hours=i % 48),
                    ),
                    now=base + timedelta(minutes=i),
                )
            )
    return ids


class TestMismatchList:
    def test_filters(self, engine: Engine, signed_in: TestClient) -> None:
        s = seed(engine)
        html = signed_in.get("/review/mismatches").text
        assert set(_ids(html)) == {s.payment_case, s.amount_case, s.access_case, s.provider_case}
        assert "all (4)" in html
        assert _ids(signed_in.get("/review/mismatches?kind=access_state_drift").text) == [s.access_case]
        by_customer = signed_in.get("/review/mismatches?customer=cus_alpha").text
        assert set(_ids(by_customer)) == {s.payment_case, s.amount_case}
        assert _ids(signed_in.get(f"/review/mismatches?run={s.run_id}&kind=provider_cost_drift").text) == [
            s.provider_case
        ]
        assert _ids(signed_in.get(f"/review/mismatches?run={s.run_id + 1}").text) == []
        yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
        dated = set(_ids(signed_in.get(f"/review/mismatches?from={yesterday}&to={yesterday}").text))
        assert dated == {s.payment_case, s.amount_case, s.provider_case}  # the access drift has no date
        assert _ids(signed_in.get("/review/mismatches?status=resolved").text) == []

    def test_bad_filter_is_a_clear_400(self, engine: Engine, signed_in: TestClient) -> None:
        for query, words in [
            ("kind=nonsense", "kind"),
            ("status=maybe", "status"),
            ("from=yesterday", "from"),
            ("sort=random", "sort"),
            ("after=garbage", "cursor"),
        ]:
            response = signed_in.get(f"/review/mismatches?{query}")
            assert response.status_code == 400, query
            assert words in response.text

    def test_sort_by_amount_and_age(self, engine: Engine, signed_in: TestClient) -> None:
        _many_cases(engine, 30)
        with Session(engine) as session:
            gap = {m.id: abs(m.actual_amount - m.expected_amount) for m in session.scalars(select(Mismatch))}  # type: ignore[operator]
        by_amount = _ids(signed_in.get("/review/mismatches?sort=amount").text)
        assert [gap[i] for i in by_amount] == sorted(gap.values(), reverse=True)
        assert by_amount == sorted(by_amount, key=lambda i: (-gap[i], -i))
        smallest = _ids(signed_in.get("/review/mismatches?sort=amount_asc").text)
        assert smallest == sorted(smallest, key=lambda i: (gap[i], i))
        oldest = _ids(signed_in.get("/review/mismatches?sort=oldest").text)
        assert oldest == sorted(oldest)  # first seen a minute apart, in id order
        assert _ids(signed_in.get("/review/mismatches").text) == sorted(oldest, reverse=True)

    def test_keyset_pages_cover_everything_once(self, engine: Engine, signed_in: TestClient) -> None:
        ids = _many_cases(engine, 120)
        for sort in ("newest", "amount", "amount_asc", "oldest"):
            url: str | None = f"/review/mismatches?sort={sort}&customer=cus_1"
            seen: list[int] = []
            pages: list[str] = []
            while url:
                html = signed_in.get(url if url.startswith("/") else "/review/mismatches" + url).text
                pages.append(url)
                seen += _ids(html)
                url = _next_link(html)
            expected = [i for n, i in enumerate(ids) if n % 3 == 1]
            assert sorted(seen) == sorted(expected), sort
            assert len(seen) == len(set(seen)), sort
            assert len(pages) == 1 + (len(expected) - 1) // 50
        # Previous goes back to exactly the page before.
        first = signed_in.get("/review/mismatches?sort=amount").text
        second_url = _next_link(first)
        assert second_url
        second = signed_in.get("/review/mismatches" + second_url).text
        back = _prev_link(second)
        assert back
        assert _ids(signed_in.get("/review/mismatches" + back).text) == _ids(first)


class TestMismatchDetail:
    def test_both_sides_side_by_side(self, engine: Engine, signed_in: TestClient) -> None:
        s = seed(engine)
        html = signed_in.get(f"/review/mismatches/{s.payment_case}").text
        stripe_side, ledger_side = html.split('class="side stripe"')[1].split('class="side ledger"')
        # The Stripe object as Stripe sent it, from the stored raw event.
        assert "pi_alpha_2" in stripe_side
        assert "evt_alpha_charge_2" in stripe_side
        assert "&#34;status&#34;: &#34;succeeded&#34;" in stripe_side or "&quot;status&quot;" in stripe_side
        assert "No ledger grant or entry refers to these Stripe objects" in ledger_side
        amount = signed_in.get(f"/review/mismatches/{s.amount_case}").text
        ledger = amount.split('class="side ledger"')[1]
        assert "#1" in ledger and "pi_alpha_1" in ledger  # the grant and what paid for it
        provider = signed_in.get(f"/review/mismatches/{s.provider_case}").text
        assert "Provider report" in provider and "costs.json#3" in provider

    def test_resolve_with_note_writes_the_audit_row(self, engine: Engine, signed_in: TestClient) -> None:
        s = seed(engine)
        page = signed_in.get(f"/review/mismatches/{s.payment_case}").text
        response = signed_in.post(
            f"/review/mismatches/{s.payment_case}/resolve",
            data={"note": "Granted by hand in support ticket 881", "csrf_token": csrf_from(page)},
        )
        assert response.status_code == 303
        html = signed_in.get(response.headers["location"]).text
        assert "resolved" in html and "Granted by hand in support ticket 881" in html
        assert "by <strong>alice</strong>" in html
        with Session(engine) as session:
            action = session.scalars(
                select(MismatchAction)
                .where(MismatchAction.mismatch_id == s.payment_case)
                .order_by(MismatchAction.id.desc())
            ).first()
            assert action is not None
            assert (action.actor, action.note, action.to_status) == (
                REVIEWER,
                "Granted by hand in support ticket 881",
                MismatchStatus.RESOLVED,
            )
        listed = signed_in.get("/review/mismatches?status=resolved").text
        assert _ids(listed) == [s.payment_case]

    def test_note_is_required_and_nothing_changes_without_it(self, engine: Engine, signed_in: TestClient) -> None:
        s = seed(engine)
        token = csrf_from(signed_in.get(f"/review/mismatches/{s.payment_case}").text)
        response = signed_in.post(
            f"/review/mismatches/{s.payment_case}/ignore", data={"note": "   ", "csrf_token": token}
        )
        assert response.status_code == 400
        assert "note is required" in response.text
        with Session(engine) as session:
            assert session.get(Mismatch, s.payment_case).status is MismatchStatus.OPEN  # type: ignore[union-attr]

    def test_invalid_transition_is_a_conflict(self, engine: Engine, signed_in: TestClient) -> None:
        s = seed(engine)
        token = csrf_from(signed_in.get(f"/review/mismatches/{s.payment_case}").text)
        url = f"/review/mismatches/{s.payment_case}"
        assert signed_in.post(url + "/reopen", data={"note": "x", "csrf_token": token}).status_code == 409
        assert signed_in.post(url + "/resolve", data={"note": "ok", "csrf_token": token}).status_code == 303
        assert signed_in.post(url + "/resolve", data={"note": "again", "csrf_token": token}).status_code == 409
        reopened = signed_in.post(url + "/reopen", data={"note": "amount was wrong", "csrf_token": token})
        assert reopened.status_code == 303
        html = signed_in.get(url).text
        assert html.index("ok") < html.index("amount was wrong")

    def test_unknown_mismatch_and_action(self, engine: Engine, signed_in: TestClient) -> None:
        s = seed(engine)
        token = csrf_from(signed_in.get("/review/mismatches").text)
        assert signed_in.get("/review/mismatches/999999").status_code == 404
        bad = signed_in.post(f"/review/mismatches/{s.payment_case}/delete", data={"note": "x", "csrf_token": token})
        assert bad.status_code == 404


class TestCsvExport:
    def test_rows_follow_the_filter(self, engine: Engine, signed_in: TestClient) -> None:
        s = seed(engine)
        response = signed_in.get("/review/mismatches.csv?customer=cus_alpha&sort=amount")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        assert "attachment" in response.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert [int(r["id"]) for r in rows] == [s.payment_case, s.amount_case]  # 2500 minor, then 2000 credits
        assert rows[0]["kind"] == "payment_without_grant"
        assert rows[0]["expected"] == "2500" and rows[0]["actual"] == "" and rows[0]["difference"] == "2500"
        assert rows[0]["last_action"] == "detected"

    def test_every_row_across_keyset_batches(
        self, engine: Engine, signed_in: TestClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from webhooks.review import cases

        monkeypatch.setattr(cases, "EXPORT_BATCH", 40)
        ids = _many_cases(engine, 130)  # four batches, the last one partial
        for sort, expected in (("oldest", ids), ("newest", ids[::-1])):
            rows = list(csv.DictReader(io.StringIO(signed_in.get(f"/review/mismatches.csv?sort={sort}").text)))
            assert [int(r["id"]) for r in rows] == expected
        by_amount = list(csv.DictReader(io.StringIO(signed_in.get("/review/mismatches.csv?sort=amount").text)))
        assert sorted(int(r["id"]) for r in by_amount) == ids
        gaps = [Decimal(r["difference"]) for r in by_amount]
        assert gaps == sorted(gaps, reverse=True)

    def test_formula_cells_are_defused(self, engine: Engine, signed_in: TestClient) -> None:
        with Session(engine) as session, session.begin():
            run = add_run(
                session, since=datetime(2026, 1, 1, tzinfo=UTC), until=datetime(2026, 1, 2, tzinfo=UTC), counts={}
            )
            add_case(
                session,
                run,
                Finding(kind=MismatchKind.MISSED_EVENT, identity="evt_x", summary='=HYPERLINK("http://evil")'),
                now=datetime(2026, 1, 2, tzinfo=UTC),
            )
        rows = list(csv.DictReader(io.StringIO(signed_in.get("/review/mismatches.csv").text)))
        assert rows[0]["summary"].startswith("'=")


class TestCustomerPage:
    def test_answers_why_was_i_charged(self, engine: Engine, signed_in: TestClient) -> None:
        s = seed(engine)
        html = signed_in.get("/review/customers/cus_alpha").text
        assert "8,756" in html  # balance 10000 - 1234 - 10
        assert f'id="entry-{s.charge_entry_id}"' in html
        row = html.split(f'id="entry-{s.charge_entry_id}"')[1].split("</tr>")[0]
        for fact in (
            "-1,234",
            "openai/gpt-4o-2024-08-06",
            "120,000 in",
            "40,000 out",
            "req_explain_42",
            "report-writer",
            "u_marta",
        ):
            assert fact in row, fact
        assert "pi_alpha_1" in html  # the grant and what paid for it
        assert "Stripe payment pi_alpha_2" in html  # the mismatch naming the customer
        found = signed_in.get(f"/review/customers/cus_alpha?find={s.charge_request_id}").text
        assert len(re.findall(r'<tr id="entry-', found)) == 1
        by_payment = signed_in.get("/review/customers/cus_alpha?find=pi_alpha_1").text
        assert len(re.findall(r'<tr id="entry-', by_payment)) == 1 and "grant" in by_payment
        # A receipt quotes the charge; the grant carries the payment intent; the stored event links them.
        with Session(engine) as session, session.begin():
            raw, _ = stripe_event(
                "evt_alpha_charge_1",
                "charge.succeeded",
                {"id": "ch_alpha_1", "object": "charge", "amount": 10_000, "currency": "usd",
                 "customer": "cus_alpha", "payment_intent": "pi_alpha_1"},
                created=datetime.now(UTC),
            )  # fmt: skip
            store_event(session, raw, parse_envelope(json.loads(raw)))
        by_charge = signed_in.get("/review/customers/cus_alpha?find=ch_alpha_1").text
        rows = re.findall(r'<tr id="entry-(\d+)"', by_charge)
        assert len(rows) == 1 and "+10,000" in by_charge

    def test_usage_by_model_feature_user_with_margin(self, engine: Engine, signed_in: TestClient) -> None:
        seed(engine)
        html = signed_in.get("/review/customers/cus_alpha").text
        usage = html.split('id="usage"')[1].split('id="debts"')[0]
        assert "openai/gpt-4o-2024-08-06" in usage and "anthropic/claude-sonnet-4" in usage
        assert "report-writer" in usage and "chat" in usage and "u_marta" in usage and "u_kim" in usage
        # 1234 credits at 1 credit per cent = $12.34 revenue; cost $0.70; margin $11.64.
        assert "$12.34" in usage and "$0.7000" in usage and "$11.64" in usage

    def test_ledger_pages_by_cursor(self, engine: Engine, signed_in: TestClient) -> None:
        with Session(engine) as session, session.begin():
            grant_credits(session, "cus_busy", units=1000, source=GrantSource.TOP_UP, idempotency_key="busy:grant")
            for i in range(120):
                consume(session, "cus_busy", request_id=f"busy-{i}", units=1)
        seen: list[int] = []
        url: str | None = "?"
        while url:
            html = signed_in.get("/review/customers/cus_busy" + url).text
            seen += [int(i) for i in re.findall(r'<tr id="entry-(\d+)"', html)]
            found = re.search(r'<a rel="next" href="([^"#]+)#ledger"', html)
            url = found.group(1).replace("&amp;", "&") if found else None
        assert len(seen) == 121 and seen == sorted(seen, reverse=True)
        consumes = signed_in.get("/review/customers/cus_busy?kind=grant").text
        assert len(re.findall(r'<tr id="entry-', consumes)) == 1

    def test_customer_search_and_unknown_customer(self, engine: Engine, signed_in: TestClient) -> None:
        seed(engine)
        response = signed_in.get("/review/customers?q=cus_alpha")
        assert response.status_code == 303 and response.headers["location"] == "/review/customers/cus_alpha"
        assert signed_in.get("/review/customers/cus_nobody").status_code == 404
        # Known to Stripe and reconciliation but never to the ledger: still a page, with what is known.
        with Session(engine) as session, session.begin():
            raw, env = stripe_event(
                "evt_gamma_1",
                "charge.succeeded",
                {"id": "ch_gamma", "object": "charge", "amount": 500, "currency": "usd", "customer": "cus_gamma"},
                created=datetime.now(UTC),
            )
            store_event(session, raw, env)  # type: ignore[arg-type]
        gamma = signed_in.get("/review/customers/cus_gamma")
        assert gamma.status_code == 200
        assert "no ledger account" in gamma.text and "evt_gamma_1" in gamma.text
        assert "No account" in signed_in.get("/review/customers?q=cus_nobody").text

    def test_stored_event_shows_the_raw_json(self, engine: Engine, signed_in: TestClient) -> None:
        seed(engine)
        html = signed_in.get("/review/events/evt_alpha_charge_2").text
        assert "charge.succeeded" in html and "ch_alpha_2" in html
        assert signed_in.get("/review/events/evt_missing").status_code == 404


class TestRuns:
    def test_counts_per_kind_and_daily_chart(self, engine: Engine, signed_in: TestClient) -> None:
        s = seed(engine)
        html = signed_in.get("/review/runs").text
        assert f"#{s.run_id}" in html
        assert f'href="/review/mismatches?run={s.run_id}&amp;kind=payment_without_grant">1<' in html
        assert "<svg" in html and "Credits granted" in html
        window = signed_in.get(
            f"/review/runs?from={(datetime.now(UTC) - timedelta(days=2)).date()}&to={datetime.now(UTC).date()}"
        ).text
        table = window.split("<tfoot>")[1]
        # Granted today: 10000 + 500 credits, $100.00 recorded; Stripe's charge yesterday: $25.00; cost $0.70.
        assert "10,500" in table and "$25.00" in table and "$100.00" in table and "$0.7000" in table
        assert Decimal("0.7") > 0

    def test_bad_window_is_a_400(self, engine: Engine, signed_in: TestClient) -> None:
        assert signed_in.get("/review/runs?from=2026-02-01&to=2026-01-01").status_code == 400
        assert signed_in.get("/review/runs?from=2026-02-01").status_code == 400
        assert signed_in.get("/review/runs?run=424242").status_code == 404


class TestConcurrentReviewers:
    def test_two_reviewers_resolving_at_once_make_one_audit_row(self, pg_engine: Engine, review_settings: str) -> None:
        s = seed(pg_engine)
        clients = []
        for _ in range(4):
            c = TestClient(mounted_review_app(), follow_redirects=False)
            assert log_in(c).status_code == 303
            clients.append((c, csrf_from(c.get(f"/review/mismatches/{s.payment_case}").text)))
        barrier = threading.Barrier(len(clients))
        codes: list[int] = []

        def act(c: TestClient, token: str, n: int) -> None:
            barrier.wait()
            response = c.post(
                f"/review/mismatches/{s.payment_case}/resolve", data={"note": f"reviewer {n}", "csrf_token": token}
            )
            codes.append(response.status_code)

        threads = [threading.Thread(target=act, args=(c, t, n)) for n, (c, t) in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [303, 409, 409, 409]
        with Session(pg_engine) as session:
            resolves = session.scalars(
                select(MismatchAction).where(
                    MismatchAction.mismatch_id == s.payment_case, MismatchAction.to_status == MismatchStatus.RESOLVED
                )
            ).all()
        assert len(resolves) == 1
