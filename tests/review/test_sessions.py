"""Sessions end on the server, and the sign-in throttle cannot be turned against a real user.

- a copy of the session cookie opens nothing once its owner signed out (or changed password);
- a stranger's failed guesses from their address do not stop the real user signing in from theirs;
- the counts are in the database: another server process (another app) and a restart see them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select
from starlette.testclient import TestClient

from ledger.db import unit_of_work
from ledger.settings import get_settings
from tests.review.conftest import PASSWORD, REVIEWER, csrf_from, log_in, mounted_review_app
from webhooks.review import views
from webhooks.review.auth import hash_password
from webhooks.review.models import ReviewLoginFailure, ReviewSession
from webhooks.review.sessions import LoginThrottle


def _signed_out(response: object) -> bool:
    return getattr(response, "status_code", None) == 303 and "/review/login" in response.headers["location"]  # type: ignore[attr-defined]


@pytest.fixture
def browser(engine: Engine, review_settings: str) -> Iterator[TestClient]:
    with TestClient(
        mounted_review_app(), base_url="http://testserver", follow_redirects=False, client=("192.0.2.10", 40000)
    ) as c:
        yield c


def other_client(address: str) -> TestClient:
    """Another browser, from another address, on a new app: as another server process (or one restarted) sees it."""
    return TestClient(
        mounted_review_app(), base_url="http://testserver", follow_redirects=False, client=(address, 40001)
    )


class TestSignOut:
    def test_a_copied_cookie_is_useless_after_sign_out(self, browser: TestClient) -> None:
        assert log_in(browser).status_code == 303
        stolen = dict(browser.cookies)
        with other_client("203.0.113.66") as thief:
            thief.cookies.update(stolen)
            assert thief.get("/review/mismatches").status_code == 200  # the copy works while the session lives
            token = csrf_from(browser.get("/review/mismatches").text)
            assert browser.post("/review/logout", data={"csrf_token": token}).status_code == 303
            assert _signed_out(thief.get("/review/mismatches"))
            assert _signed_out(thief.get("/review/customers"))
        with unit_of_work() as session:
            assert session.scalar(select(func.count()).select_from(ReviewSession)) == 0

    def test_a_password_change_ends_the_reviewers_sessions(
        self, browser: TestClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        assert log_in(browser).status_code == 303
        copy = dict(browser.cookies)
        monkeypatch.setenv("REVIEW_USERS", f"{REVIEWER}:{hash_password('a new password')}")
        get_settings.cache_clear()
        assert _signed_out(browser.get("/review/mismatches"))
        # Even with the old password back, that session is gone for good.
        monkeypatch.setenv("REVIEW_USERS", f"{REVIEWER}:{hash_password(PASSWORD)}")
        get_settings.cache_clear()
        with other_client("192.0.2.10") as again:
            again.cookies.update(copy)
            assert _signed_out(again.get("/review/mismatches"))

    def test_two_sessions_are_independent(self, browser: TestClient) -> None:
        assert log_in(browser).status_code == 303
        with other_client("192.0.2.11") as laptop:
            assert log_in(laptop).status_code == 303
            token = csrf_from(browser.get("/review/mismatches").text)
            browser.post("/review/logout", data={"csrf_token": token})
            assert laptop.get("/review/mismatches").status_code == 200


class TestThrottle:
    @pytest.fixture(autouse=True)
    def _throttle(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(views, "throttle", LoginThrottle(max_failures=3, window_seconds=600))

    def test_a_strangers_failures_do_not_lock_out_the_real_user(self, browser: TestClient) -> None:
        with other_client("203.0.113.66") as stranger:
            for _ in range(5):
                assert log_in(stranger, password="guess").status_code in (401, 429)
            assert log_in(stranger).status_code == 429  # the stranger's address is blocked, even with the password
        assert log_in(browser).status_code == 303  # the real user, from their own address, signs in
        assert browser.get("/review/mismatches").status_code == 200

    def test_the_counts_are_shared_by_processes_and_survive_a_restart(self, browser: TestClient) -> None:
        for _ in range(2):
            assert log_in(browser, password="guess").status_code == 401
        # A restart: a new app and a new throttle object; only the database remembers.
        views.throttle = LoginThrottle(max_failures=3, window_seconds=600)
        with other_client("192.0.2.10") as same_address_new_process:
            assert log_in(same_address_new_process, password="guess").status_code == 401
            assert log_in(same_address_new_process).status_code == 429
        with unit_of_work() as session:
            assert session.scalar(select(func.count()).select_from(ReviewLoginFailure)) == 3

    def test_an_address_guessing_many_names_is_blocked(
        self, browser: TestClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(
            views, "throttle", LoginThrottle(max_failures=3, window_seconds=600, max_failures_per_address=4)
        )
        for n in range(4):
            assert log_in(browser, name=f"user{n}", password="guess").status_code == 401
        assert log_in(browser).status_code == 429

    def test_a_success_forgets_that_addresss_failures_for_the_name(self, browser: TestClient) -> None:
        for _ in range(2):
            assert log_in(browser, password="guess").status_code == 401
        assert log_in(browser).status_code == 303
        with unit_of_work() as session:
            assert session.scalar(select(func.count()).select_from(ReviewLoginFailure)) == 0
