"""The review pages in a real browser: Debian's Chromium, headless, driven by Playwright, JavaScript off.

The app runs under a real uvicorn server on a free localhost port. Screenshots of the list, a detail page, a
customer page and the runs page are saved under test-output/review/ at the repository root.
"""

from __future__ import annotations

import csv
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import Engine

from tests.conftest import IN_CI, REPO
from tests.review.conftest import PASSWORD, REVIEWER, Seeded, mounted_review_app, seed

pytestmark = [pytest.mark.browser, pytest.mark.postgres]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT = REPO / "test-output" / "review"


@pytest.fixture
def chromium() -> Path:
    """Debian's chromium; missing it fails under CI (.ci/run installs it) and skips elsewhere."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install -y chromium)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return CHROMIUM


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def live_server(pg_engine: Engine, review_settings: str) -> Iterator[str]:
    """The review app under uvicorn in a thread; yields its base URL."""
    config = uvicorn.Config(
        mounted_review_app(), host="127.0.0.1", port=_free_port(), log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="review-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start", pytrace=False)
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class TestReviewInBrowser:
    def test_review_a_case_end_to_end(self, chromium: Path, live_server: str, pg_engine: Engine) -> None:
        from playwright.sync_api import expect, sync_playwright

        s: Seeded = seed(pg_engine)
        OUTPUT.mkdir(parents=True, exist_ok=True)
        print(f"\nscreenshots: {OUTPUT}")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
            try:
                # No JavaScript at all: reading and acting must work with plain HTML forms and links.
                context = browser.new_context(
                    java_script_enabled=False, accept_downloads=True, viewport={"width": 1440, "height": 900}
                )
                page = context.new_page()
                page.set_default_timeout(15_000)

                # Without a session the list sends us to the login form; signing in brings us back.
                page.goto(f"{live_server}/review/mismatches")
                expect(page).to_have_url(f"{live_server}/review/login?next=%2Freview%2Fmismatches")
                page.fill("input[name=username]", REVIEWER)
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                expect(page).to_have_url(f"{live_server}/review/mismatches")
                expect(page.locator("tr[id^=mismatch-]")).to_have_count(4)
                page.screenshot(path=str(OUTPUT / "mismatch-list.png"), full_page=True)

                # Filter: one kind, one customer.
                page.select_option("select[name=kind]", "payment_without_grant")
                page.fill("input[name=customer]", "cus_alpha")
                page.click("form.filters button[type=submit]")
                rows = page.locator("tr[id^=mismatch-]")
                expect(rows).to_have_count(1)
                expect(rows.first).to_contain_text("pi_alpha_2")

                # Open it: both sides' evidence.
                rows.first.locator(f"a[href='/review/mismatches/{s.payment_case}']").first.click()
                expect(page).to_have_url(f"{live_server}/review/mismatches/{s.payment_case}")
                expect(page.locator(".side.stripe")).to_contain_text("ch_alpha_2")
                expect(page.locator(".side.ledger")).to_contain_text("No ledger grant")
                page.screenshot(path=str(OUTPUT / "mismatch-detail.png"), full_page=True)

                # Resolve it with a note; the note is in its history, the status in the list.
                note = "Customer paid by bank transfer; credits granted by hand (ticket 881)"
                page.fill("#note-resolve", note)
                page.click("form[action$='/resolve'] button[type=submit]")
                expect(page.locator("#status")).to_have_text("resolved")
                expect(page.locator("#history")).to_contain_text(note)
                expect(page.locator("#history")).to_contain_text(f"by {REVIEWER}")
                page.screenshot(path=str(OUTPUT / "mismatch-resolved.png"), full_page=True)
                page.goto(f"{live_server}/review/mismatches?customer=cus_alpha")
                resolved = page.locator(f"#mismatch-{s.payment_case} [data-status]")
                expect(resolved).to_have_text("resolved")
                page.click("nav.tabs >> text=resolved")
                expect(page.locator("tr[id^=mismatch-]")).to_have_count(1)

                # The CSV of the filtered list.
                page.goto(f"{live_server}/review/mismatches?customer=cus_alpha&sort=amount")
                with page.expect_download() as download_info:
                    page.click("a.csv")
                download = download_info.value
                body = Path(download.path()).read_text(encoding="utf-8")
                (OUTPUT / download.suggested_filename).write_text(body, encoding="utf-8")
                csv_rows = list(csv.DictReader(io.StringIO(body)))
                assert [(int(r["id"]), r["status"]) for r in csv_rows] == [
                    (s.payment_case, "resolved"),
                    (s.amount_case, "open"),
                ]
                assert csv_rows[0]["last_note"] == note and csv_rows[0]["last_actor"] == REVIEWER

                # The customer page answers "why was I charged?": find the entry behind a charge.
                page.goto(f"{live_server}/review/mismatches/{s.payment_case}")
                page.click("dl.facts >> text=cus_alpha")
                expect(page).to_have_url(f"{live_server}/review/customers/cus_alpha")
                entry = page.locator(f"#entry-{s.charge_entry_id}")
                expect(entry).to_contain_text("-1,234")
                expect(entry).to_contain_text("gpt-4o-2024-08-06")
                page.screenshot(path=str(OUTPUT / "customer.png"), full_page=True)
                page.fill("input[name=find]", s.charge_request_id)
                page.click("#ledger form.filters button[type=submit]")
                ledger_rows = page.locator("table.ledger tbody tr[id^=entry-]")
                expect(ledger_rows).to_have_count(1)
                expect(ledger_rows.first).to_contain_text("report-writer")
                expect(ledger_rows.first).to_contain_text("120,000 in")

                # The runs page with its chart (inline SVG, no script).
                page.goto(f"{live_server}/review/runs")
                expect(page.locator(".chart svg")).to_be_visible()
                page.screenshot(path=str(OUTPUT / "runs.png"), full_page=True)

                # Signing out ends it: the list is behind the login again.
                page.click("form.whoami button")
                page.goto(f"{live_server}/review/mismatches")
                expect(page).to_have_url(f"{live_server}/review/login?next=%2Freview%2Fmismatches")
                context.close()
            finally:
                browser.close()
        for name in ("mismatch-list.png", "mismatch-detail.png", "customer.png", "runs.png"):
            assert (OUTPUT / name).stat().st_size > 10_000, name
        assert os.path.isdir(OUTPUT)
